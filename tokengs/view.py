"""Look at reconstructed scenes in an interactive web viewer (viser): the Gaussians, the cameras
they were reconstructed from, and, for dynamic scenes, the dynamic Gaussians moving along their tracks.

    python -m tokengs.view PATH [--port 8080] [--host 0.0.0.0]      (or: tokengs-view PATH)

PATH is a PLY written by tokengs.gaussians.save_ply, or a folder holding some: a reconstruct
output (gaussians.ply), the demo's workspace (scene.ply, eval*/gaussians/gaussians_*.ply) or an
evaluation workspace (gaussians/gaussians_TAG.ply). Beside a PLY X.ply the viewer reads
X.cameras.json or cameras.json (tokengs.scene_files: frustums with their images) and
X.tracks.npz or tracks.npz (scripts/render_kubric_dyn.py: a time slider). Where the folder
holds several PLYs, a dropdown switches between them. Open the printed URL in a browser;
`?initialCameraPosition=x,y,z&initialCameraLookAt=x,y,z` in the URL sets the starting view.

Needs viser: pip install -e ".[viewer]". Bad input (a missing or unreadable PLY, a folder
with nothing to show, a port in use) is one line on stderr and exit status 2, before any server starts.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from tokengs.cli import CommandParser, add_debug_flag, entry_point
from tokengs.scene_files import CameraRecord, SceneFileError, cameras_beside, read_cameras, tracks_beside

INSTALL = 'pip install -e ".[viewer]"'
PROG = "tokengs-view"
# The fields a 3DGS PLY must have for load_ply (tokengs.gaussians.PLY_FIELDS, kept here so that
# checking a file's header does not import torch).
REQUIRED_FIELDS = ("x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
                   "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3")
FRUSTUM_IMAGE_SIDE = 256  # frustum images are downscaled to at most this many pixels a side (sent to every browser)
PLAY_FPS = 8.0


class ViewError(Exception):
    """Bad input: its message is the one line the user reads (what is wrong, and the fix)."""


# ---------------------------------------------------------------------------------------------
# What there is to show
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SceneSource:
    """One PLY and the files beside it that belong to it."""

    name: str  # shown in the dropdown: the PLY's path relative to the folder the viewer was given
    ply: Path
    cameras: Optional[Path]  # a cameras.json (tokengs.scene_files)
    tracks: Optional[Path]  # a tracks.npz (scripts/render_kubric_dyn.py)


def find_scenes(path: Path) -> list[SceneSource]:
    """The PLYs at `path` (a PLY, or a folder searched recursively), top-level ones first; ViewError where there is none."""
    if not path.exists():
        raise ViewError(f"{path} does not exist; give a PLY written by tokengs (save_ply) or a folder holding one")
    if path.is_file():
        if path.suffix.lower() != ".ply":
            raise ViewError(f"{path} is not a .ply file; give a PLY written by tokengs (save_ply) or a folder holding one")
        plies, root = [path], path.parent
    else:
        plies = sorted((p for p in path.rglob("*.ply") if p.is_file()), key=lambda p: (len(p.relative_to(path).parts), str(p)))
        root = path
        if not plies:
            raise ViewError(f"{path} holds no .ply file; give a PLY, a reconstruct output folder (gaussians.ply), "
                            "the demo workspace (scene.ply) or an evaluation workspace (gaussians/gaussians_TAG.ply)")
    return [SceneSource(str(p.relative_to(root)), p, cameras_beside(p), tracks_beside(p)) for p in plies]


def ply_problem(path: Path) -> Optional[str]:
    """Why `path` is not a 3DGS PLY that load_ply can read (from its header and size alone), or None."""
    from plyfile import PlyData

    try:
        # memory-mapped: plyfile parses the header and checks that the file holds every row it
        # promises, without reading the values
        vertex = PlyData.read(str(path), mmap=True)["vertex"]
    except OSError as error:
        return f"cannot be read ({error.strerror or error})"
    except KeyError:
        return "it has no vertex element"
    except Exception as error:  # plyfile raises several kinds on malformed files; all mean the same here
        return f"{type(error).__name__}: {error}"
    missing = [name for name in REQUIRED_FIELDS if name not in {prop.name for prop in vertex.properties}]
    if missing:
        return f"its vertices lack the 3DGS fields {', '.join(missing)}"
    if vertex.count == 0:
        return "it holds no Gaussians"
    return None


@dataclass
class Splats:
    """Gaussians as viser draws them (numpy, float32)."""

    centers: np.ndarray  # [N, 3]
    covariances: np.ndarray  # [N, 3, 3] R diag(scale^2) R^T
    rgbs: np.ndarray  # [N, 3] in [0, 1]
    opacities: np.ndarray  # [N, 1] in [0, 1]

    def select(self, index) -> "Splats":
        return Splats(self.centers[index], self.covariances[index], self.rgbs[index], self.opacities[index])

    def __len__(self) -> int:
        return len(self.centers)


def read_splats(ply: Path) -> Splats:
    """A PLY of save_ply -> Splats. load_ply activates the stored values (colours are SH degree-0
    coefficients, opacities logits, scales logs), so only the covariances are built here."""
    import torch

    from tokengs.cameras import quaternion_to_matrix
    from tokengs.gaussians import load_ply

    gaussians = load_ply(ply)
    rotations = quaternion_to_matrix(gaussians.quats.double())  # [N, 3, 3]; it normalizes the quaternions
    covariances = rotations @ torch.diag_embed(gaussians.scales.double() ** 2) @ rotations.transpose(-1, -2)
    splats = Splats(centers=gaussians.means.numpy(), covariances=covariances.float().numpy(),
                    rgbs=gaussians.colors.clamp(0, 1).numpy(), opacities=gaussians.opacities.clamp(0, 1)[:, None].numpy())
    # a zero quaternion or an overflowing scale gives NaN or inf: leave those Gaussians out rather than the scene
    finite = np.isfinite(splats.centers).all(1) & np.isfinite(splats.covariances).all((1, 2)) & np.isfinite(splats.rgbs).all(1)
    return splats if finite.all() else splats.select(finite)


def splats_or_problem(ply: Path):
    """Splats, or why the PLY cannot give any (a string)."""
    problem = ply_problem(ply)
    if problem is not None:
        return problem
    try:
        splats = read_splats(ply)
    except Exception as error:  # plyfile raises many kinds on malformed files; all mean the same to the user
        return f"{type(error).__name__}: {error}"
    return splats if len(splats) else "none of its Gaussians has finite values"


def unreadable(ply: Path, problem: str) -> str:
    return f"{ply} is not a readable 3DGS PLY: {problem}; write it with tokengs.gaussians.save_ply"


@dataclass
class Tracks:
    """Dynamic Gaussians of a tracks.npz matched to rows of the PLY: they move, the rest stays."""

    rows: np.ndarray  # [M] rows of the PLY's Splats that the tracks move
    means: np.ndarray  # [T, M, 3] their centers at each time
    rgbs: Optional[np.ndarray]  # [T, M, 3] their colours at each time, where the file has them
    opacities: Optional[np.ndarray]  # [T, M, 1]
    frames: np.ndarray  # [T] the frame numbers
    start: int  # the time the PLY was written at (its centers equal the tracks' there)


def _row_keys(points: np.ndarray) -> np.ndarray:
    """[N, 3] -> [N] opaque keys, equal exactly where the float32 points are equal."""
    return np.ascontiguousarray(points, dtype=np.float32).view(np.dtype((np.void, 12))).ravel()


def match_tracks(path: Path, splats: Splats) -> Tracks:
    """Read a tracks.npz (means [T, N_dyn, 3]; optional: opacities [T, N_dyn], colors [T, N_dyn, 3],
    frames [T], and ply_rows [N_dyn] (-1: not in the PLY) with ply_time, the time index the PLY
    was written at) and find its Gaussians in `splats`. Without ply_rows, a PLY written at one of
    the tracks' times holds exactly the tracks' float32 means of that time: the time with the
    most exact matches is the PLY's, and its matches are the rows.
    SceneFileError where the file cannot be read or nothing matches."""
    try:
        with np.load(path) as content:
            data = {key: content[key] for key in content.files}
        means = np.asarray(data["means"], dtype=np.float32)
        if means.ndim != 3 or means.shape[-1] != 3 or len(means) == 0:
            raise ValueError(f"means must be [T, N, 3], got shape {means.shape}")
    except (OSError, ValueError, KeyError) as error:
        raise SceneFileError(f"{path} is not a readable tracks file ({error})") from None
    frames = np.asarray(data.get("frames", np.arange(len(means))))
    if "ply_rows" in data:
        rows, start = np.asarray(data["ply_rows"], dtype=np.int64), int(data.get("ply_time", 0))
        rows = np.where(rows < len(splats), rows, -1)
    else:
        keys = _row_keys(splats.centers)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]

        def rows_at(t: int) -> np.ndarray:
            query = _row_keys(means[t])
            at = np.minimum(np.searchsorted(sorted_keys, query), len(keys) - 1)
            return np.where(sorted_keys[at] == query, order[at], -1)

        candidates = [rows_at(t) for t in range(len(means))]
        start = int(np.argmax([(r >= 0).sum() for r in candidates]))
        rows = candidates[start]
    found = rows >= 0
    if not found.any():
        raise SceneFileError(f"{path}: none of its {means.shape[1]} tracks starts at a Gaussian of the PLY beside it "
                             "(write the PLY at one of the tracks' frames, or add ply_rows to the file); no time slider")

    def per_time(key: str, width: int) -> Optional[np.ndarray]:
        """data[key] of the matched tracks as [T, M, width] in [0, 1], or None where the file lacks it."""
        if key not in data:
            return None
        return np.asarray(data[key], dtype=np.float32).reshape(len(means), -1, width)[:, found].clip(0, 1)

    return Tracks(rows=rows[found], means=means[:, found], rgbs=per_time("colors", 3), opacities=per_time("opacities", 1),
                  frames=frames, start=start)


# ---------------------------------------------------------------------------------------------
# Where to look from
# ---------------------------------------------------------------------------------------------

@dataclass
class View:
    """A camera for the browser: viser's initial camera and every client's "Reset View"."""

    position: np.ndarray  # [3]
    look_at: np.ndarray  # [3]
    up: np.ndarray  # [3] unit
    fov: float  # vertical, radians


def scene_extent(centers: np.ndarray) -> tuple[np.ndarray, float]:
    """A robust center [3] and radius of a point set [N, 3]: the median and the 90th-percentile distance to it."""
    center = np.median(centers, axis=0)
    radius = float(np.percentile(np.linalg.norm(centers - center, axis=1), 90)) if len(centers) else 1.0
    return center, max(radius, 1e-6)


def default_view(splats: Splats, cameras: list[CameraRecord]) -> View:
    """From a little behind and above the first camera, towards the scene's median depth in it,
    so that its frustum (and image) shows small below the middle rather than covering the view;
    without cameras, from in front of the scene in the project's frame (OpenCV: z forward, y down)."""
    center, radius = scene_extent(splats.centers)
    if not cameras:
        forward = np.array([0.0, 0.0, 1.0])
        return View(center - 2.5 * radius * forward, center, np.array([0.0, -1.0, 0.0]), np.deg2rad(60.0))
    c2w = cameras[0].c2w
    position, forward, up = c2w[:3, 3], c2w[:3, 2], -c2w[:3, 1]
    depths = (splats.centers - position) @ forward
    depth = float(np.median(depths[depths > 0])) if (depths > 0).any() else 2 * radius
    eye = position - 0.4 * depth * forward + 0.15 * depth * up
    return View(eye, position + depth * forward, up / np.linalg.norm(up), cameras[0].vertical_fov)


def scene_up(cameras: list[CameraRecord]) -> np.ndarray:
    """The mean "up" (-y) of the cameras, or the project frame's -y: orbiting turns around it."""
    if not cameras:
        return np.array([0.0, -1.0, 0.0])
    up = -np.mean([c.c2w[:3, 1] for c in cameras], axis=0)
    norm = np.linalg.norm(up)
    return up / norm if norm > 1e-6 else -cameras[0].c2w[:3, 1]


def frustum_image(camera: CameraRecord) -> Optional[np.ndarray]:
    """The camera's image [H, W, 3] uint8, downscaled to FRUSTUM_IMAGE_SIDE; None where it has none or it is unreadable."""
    if camera.image is None:
        return None
    from PIL import Image

    try:
        with Image.open(camera.image) as image:
            image = image.convert("RGB")
            image.thumbnail((FRUSTUM_IMAGE_SIDE, FRUSTUM_IMAGE_SIDE))
            return np.asarray(image)
    except OSError as error:
        print(f"{PROG}: {camera.image}: cannot read the image of camera {camera.name!r} ({error}); drawn without it", flush=True)
        return None


@dataclass
class LoadedScene:
    source: SceneSource
    splats: Splats
    cameras: list[CameraRecord]
    tracks: Optional[Tracks]
    view: View
    up: np.ndarray  # [3]
    notes: list[str]  # what could not be shown, for the GUI and the terminal


def load_scene(source: SceneSource, splats: Optional[Splats] = None) -> LoadedScene:
    """Read the PLY (unless its `splats` are given; ViewError where it is unreadable) and what lies
    beside it (problems there become notes)."""
    splats = splats if splats is not None else splats_or_problem(source.ply)
    if isinstance(splats, str):
        raise ViewError(unreadable(source.ply, splats))
    notes, cameras, tracks = [], [], None
    if source.cameras is not None:
        try:
            cameras = read_cameras(source.cameras)
        except SceneFileError as error:
            notes.append(str(error))
    if source.tracks is not None:
        try:
            tracks = match_tracks(source.tracks, splats)
        except SceneFileError as error:
            notes.append(str(error))
    return LoadedScene(source, splats, cameras, tracks, default_view(splats, cameras), scene_up(cameras), notes)


def load_first(scenes: list[SceneSource], given: Path) -> tuple[list[SceneSource], LoadedScene]:
    """The first scene that loads, and the scenes left for the dropdown: those whose PLY header is
    sound (the others are named on the terminal). ViewError where no scene loads."""
    problems = {source.ply: ply_problem(source.ply) for source in scenes}  # headers only: cheap for many files
    first = None
    for source in (s for s in scenes if problems[s.ply] is None):
        splats = splats_or_problem(source.ply)
        if isinstance(splats, str):
            problems[source.ply] = splats
            continue
        first = load_scene(source, splats)
        break
    if first is None:
        ply, problem = next((ply, problem) for ply, problem in problems.items() if problem is not None)
        if len(scenes) == 1:
            raise ViewError(unreadable(ply, problem))
        raise ViewError(f"{given} holds {len(scenes)} .ply files but no readable 3DGS PLY (e.g. {ply.name}: {problem}); "
                        "write them with tokengs.gaussians.save_ply")
    for ply, problem in problems.items():
        if problem is not None:
            print(f"{PROG}: skipping {ply}: {problem}", flush=True)
    return [s for s in scenes if problems[s.ply] is None], first


# ---------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------

def view_command(path: Path) -> str:
    """The command that shows `path`, with how to install the viewer where viser is missing."""
    import importlib.util

    try:
        missing = importlib.util.find_spec("viser") is None
    except ValueError:  # sys.modules holds None for it: imports of it fail
        missing = True
    install = f"  ({INSTALL} first)" if missing else ""
    return f"python -m tokengs.view {path}{install}"


def import_viser():
    try:
        import viser
    except ImportError:
        raise ViewError(f"the viewer needs viser, which is not installed: {INSTALL} (or: pip install viser)") from None
    return viser


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def check_port(host: str, port: int) -> None:
    """ViewError where the server could not listen on host:port (viser would silently take the next port)."""
    if not 0 <= port <= 65535:
        raise ViewError(f"--port {port} is not a port; pass one in 1..65535 (0: any free port)")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as error:
        raise ViewError(f"--host {host} cannot be resolved ({error.strerror}); "
                        "pass an address such as 127.0.0.1 or 0.0.0.0") from None
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR like the server's own socket: a port in TIME_WAIT is free, one with a listener is not
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            hint = f"pass a free one, e.g. --port {free_port(host)}" if port else "pass another --host"
            raise ViewError(f"port {port} on {host} is not available ({error.strerror}; another viewer?); {hint}") from None


def quaternion_of(rotation: np.ndarray) -> np.ndarray:
    """[3, 3] rotation -> [4] w x y z (what viser's scene nodes take)."""
    import viser.transforms as vtf

    return vtf.SO3.from_matrix(rotation).wxyz


class Viewer:
    """The GUI and scene of one viser server: the current scene's splats and frustums, a scene
    dropdown where there are several, a time slider where the scene has tracks."""

    def __init__(self, server, scenes: list[SceneSource], first: LoadedScene):
        self.server = server
        self.scenes = {s.name: s for s in scenes}
        self.lock = threading.RLock()  # GUI callbacks run on viser's thread pool
        self.closed = threading.Event()  # set by close(): the play loop ends
        self.nodes: list = []  # scene nodes and GUI elements of the current scene, removed on a switch
        self.frustums: list = []  # the camera frustums among them
        self.current: Optional[LoadedScene] = None
        self.static = self.dynamic = None  # splat handles: the Gaussians that stay, those that move
        self.time_slider = self.play = self.frame_label = self.dropdown = None
        self.show_cameras = server.gui.add_checkbox("show cameras", initial_value=True)
        self.show_cameras.on_update(lambda _: self._set_frustums_visible(self.show_cameras.value))
        if len(scenes) > 1:
            self.dropdown = server.gui.add_dropdown("scene", options=list(self.scenes), initial_value=first.source.name)
            self.dropdown.on_update(lambda _: self.show(self.dropdown.value))
        self.info = server.gui.add_markdown("")
        self.show(first)
        threading.Thread(target=self._play_loop, daemon=True, name="tokengs-view-play").start()

    def close(self) -> None:
        """Stop playing (before the server stops: the loop would write to closed connections)."""
        self.closed.set()

    def show(self, scene) -> None:
        """Replace what is drawn by `scene` (a LoadedScene, or the name of one of the scenes)."""
        with self.lock:
            if isinstance(scene, str):
                try:
                    scene = load_scene(self.scenes[scene])
                except ViewError as error:
                    print(f"{PROG}: {error}", flush=True)
                    self.info.content = f"**Cannot show this scene:** {error}"
                    return
            for node in self.nodes:
                node.remove()
            self.nodes, self.frustums, self.current = [], [], scene
            self._add_splats(scene)
            self._add_frustums(scene)
            self.show_cameras.visible = bool(scene.cameras)
            self._add_time_gui(scene)
            self._set_view(scene)
            tracks = f", {len(scene.tracks.rows)} moving over {len(scene.tracks.frames)} frames" if scene.tracks else ""
            self.info.content = "\n\n".join([f"`{scene.source.ply}`: {len(scene.splats)} Gaussians{tracks}, "
                                             f"{len(scene.cameras)} cameras"] + [f"*{note}*" for note in scene.notes])
            for note in scene.notes:
                print(f"{PROG}: {note}", flush=True)

    def _add_splats(self, scene: LoadedScene) -> None:
        # Two nodes where the scene moves: viser sorts all splats together, and a time step then
        # sends only the moving ones.
        moving = np.zeros(len(scene.splats), dtype=bool)
        if scene.tracks is not None:
            moving[scene.tracks.rows] = True
        self.static = self.dynamic = None
        if not moving.all():
            self.static = self.server.scene.add_gaussian_splats("/scene/static", **vars(scene.splats.select(~moving)))
            self.nodes.append(self.static)
        if scene.tracks is not None:
            start = self._dynamic_at(scene, scene.tracks.start)
            self.dynamic = self.server.scene.add_gaussian_splats("/scene/dynamic", **vars(start))
            self.nodes.append(self.dynamic)

    @staticmethod
    def _dynamic_at(scene: LoadedScene, t: int) -> Splats:
        tracks = scene.tracks
        base = scene.splats.select(tracks.rows)
        return Splats(centers=tracks.means[t], covariances=base.covariances,
                      rgbs=tracks.rgbs[t] if tracks.rgbs is not None else base.rgbs,
                      opacities=tracks.opacities[t] if tracks.opacities is not None else base.opacities)

    def _add_frustums(self, scene: LoadedScene) -> None:
        if not scene.cameras:
            return
        # frustums 3% of the way to what the first camera looks at: visible, not in the way
        first = scene.cameras[0].c2w[:3, 3]
        size = 0.03 * float(np.linalg.norm(scene.view.look_at - first))
        for i, camera in enumerate(scene.cameras):
            frustum = self.server.scene.add_camera_frustum(
                f"/cameras/{i:03d}", fov=camera.vertical_fov, aspect=camera.width / camera.height, scale=size,
                thickness=0.04 * size,  # viser's default (0.02 world units) is thicker than a small frustum
                color=(230, 120, 20), image=frustum_image(camera), wxyz=quaternion_of(camera.c2w[:3, :3]),
                position=camera.c2w[:3, 3], visible=self.show_cameras.value)
            self.frustums.append(frustum)
        self.nodes += self.frustums

    def _set_frustums_visible(self, visible: bool) -> None:
        with self.lock:
            for frustum in self.frustums:
                frustum.visible = visible

    def _add_time_gui(self, scene: LoadedScene) -> None:
        self.time_slider = self.play = self.frame_label = None
        if scene.tracks is None or len(scene.tracks.frames) < 2:
            return
        frames = scene.tracks.frames
        self.time_slider = self.server.gui.add_slider("time step", min=0, max=len(frames) - 1, step=1,
                                                      initial_value=scene.tracks.start)
        self.time_slider.on_update(lambda _: self.set_time(int(self.time_slider.value)))
        self.play = self.server.gui.add_checkbox("play", initial_value=False)
        self.frame_label = self.server.gui.add_markdown(f"frame {frames[scene.tracks.start]}")
        self.nodes += [self.time_slider, self.play, self.frame_label]

    def set_time(self, t: int) -> None:
        with self.lock:
            scene = self.current
            if scene.tracks is None or self.dynamic is None or self.frame_label is None:
                return
            t = int(np.clip(t, 0, len(scene.tracks.means) - 1))
            self.dynamic.set_gaussians(**vars(self._dynamic_at(scene, t)))  # one update of the moving splats only
            self.frame_label.content = f"frame {scene.tracks.frames[t]}"

    def _play_loop(self) -> None:
        """Advance the time slider while "play" is ticked (the slider's callback moves the Gaussians)."""
        while not self.closed.wait(1.0 / PLAY_FPS):
            with self.lock:
                slider, play = self.time_slider, self.play
                if slider is None or play is None or not play.value:
                    continue
                # viser runs the slider's callback (set_time) within the assignment
                slider.value = (int(slider.value) + 1) % (int(slider.max) + 1)

    def _set_view(self, scene: LoadedScene) -> None:
        """The scene's starting view for new browsers ("Reset View" too), and for those already open."""
        self.server.scene.set_up_direction(scene.up)
        initial = self.server.initial_camera
        initial.position, initial.look_at, initial.up, initial.fov = (
            scene.view.position, scene.view.look_at, scene.view.up, scene.view.fov)
        for client in self.server.get_clients().values():
            self._apply(client.camera, scene.view)

    @staticmethod
    def _apply(camera, view: View) -> None:
        try:
            with camera.client.atomic():
                camera.up_direction, camera.fov = view.up, view.fov
                camera.position, camera.look_at = view.position, view.look_at
        except ValueError:  # viser refuses a momentary position == look_at; "Reset View" still gets there
            pass


def browser_url(host: str, port: int) -> str:
    shown = "localhost" if host in ("0.0.0.0", "::", "") else (f"[{host}]" if ":" in host else host)
    return f"http://{shown}:{port}"


def parse_args(argv) -> argparse.Namespace:
    parser = CommandParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path, help="a PLY written by tokengs, or a folder of them (reconstruct, demo "
                                                "or evaluation output)")
    parser.add_argument("--port", type=int, default=8080, help="port to serve on (default 8080; 0: any free port)")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0: every interface; "
                                                          "127.0.0.1: this machine only)")
    add_debug_flag(parser)
    return parser.parse_args(argv)


@entry_point
def main(argv) -> int:
    """`tokengs-view`: bad input is one line and exit status 2; other errors follow `tokengs.cli.entry_point`'s rule."""
    args = parse_args(argv)
    try:
        viser = import_viser()
        scenes, first = load_first(find_scenes(args.path), args.path)
        check_port(args.host, args.port)
    except ViewError as error:
        print(f"{PROG}: {error}", file=sys.stderr, flush=True)
        return 2
    with contextlib.redirect_stdout(io.StringIO()):  # viser's banner: the URL is in our own line below
        server = viser.ViserServer(host=args.host, port=args.port, label="tokengs", verbose=False)
    if args.port and server.get_port() != args.port:  # taken between the check and now: viser moved on
        server.stop()
        print(f"{PROG}: port {args.port} on {args.host} was taken while starting; pass a free one with --port", file=sys.stderr)
        return 2
    viewer = Viewer(server, scenes, first)
    more = f", {len(scenes)} scenes in the dropdown" if len(scenes) > 1 else ""
    print(f"{PROG}: serving {first.source.ply} ({len(first.splats)} Gaussians, {len(first.cameras)} cameras{more}) "
          f"at {browser_url(args.host, server.get_port())}  (Ctrl+C stops)", flush=True)
    try:
        threading.Event().wait()  # the server runs on its own threads until the process is interrupted
    except KeyboardInterrupt:
        viewer.close()
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
