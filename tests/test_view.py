"""The interactive viewer (tokengs.view): it serves a scene that a real browser draws, and refuses
bad input with one line and exit status 2.

The browser tests start `python -m tokengs.view` on a small colourful scene, open it in headless
Chromium (Debian's `chromium`, driven through the DevTools protocol with the websockets client
that viser installs) and read screenshots: the scene's colours must cover a good part of the
page. They are skipped, with the reason, only where no Chromium is found (.ci/run installs it).
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tokengs.gaussians import Gaussians, save_ply
from tokengs.scene_files import cameras_path_for, read_cameras, write_cameras
from tokengs import view

REPO = Path(__file__).resolve().parents[1]
SCREENSHOT_COPY = Path("/tmp/viewer_screenshot.png")  # for people to look at
SIDE_SCREENSHOT_COPY = Path("/tmp/viewer_screenshot_side.png")
WINDOW = (800, 600)  # browser window, pixels

# The test scene: flat coloured panels (and one blob) about 4 units in front of camera 0, which
# sits at the origin looking down +z (OpenCV axes). Colours in [0, 1].
SCENE_COLOURS = {"red": (0.90, 0.12, 0.12), "green": (0.12, 0.70, 0.20),
                 "blue": (0.12, 0.25, 0.90), "yellow": (0.95, 0.85, 0.10)}
COLOUR_TOLERANCE = 60.0  # a pixel "has" a colour within this RGB distance (0..255 scale)
MIN_COLOUR_FRACTION = 0.01  # each colour must cover at least this fraction of the screenshot
MIN_SCENE_FRACTION = 0.08  # and all of them together at least this
HTTP_DEADLINE_S = 10.0  # the server must answer HTTP this soon after the process starts
DRAW_DEADLINE_S = 40.0  # SwiftShader (software WebGL) is slow, but not this slow

# Chromium's flags that work in a container without GPU, display or network: software WebGL via
# ANGLE's SwiftShader backend, no first-run or background traffic, a fresh profile per run.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--use-gl=angle", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                  "--hide-scrollbars", "--mute-audio"]


# ---------------------------------------------------------------------------------------------
# The scene
# ---------------------------------------------------------------------------------------------

def panel(center, size, colour, spacing=0.05) -> Gaussians:
    """A flat square panel of Gaussians facing the camera (normal along z): [N, ...]."""
    steps = torch.arange(-size / 2, size / 2 + 1e-6, spacing)
    grid = torch.stack(torch.meshgrid(steps, steps, indexing="xy"), -1).reshape(-1, 2)
    n = len(grid)
    means = torch.cat([grid, torch.zeros(n, 1)], 1) + torch.tensor(center)
    return Gaussians(means=means, opacities=torch.full((n,), 0.95),
                     scales=torch.tensor([spacing * 0.8, spacing * 0.8, 0.01]).expand(n, 3).clone(),
                     quats=torch.tensor([1.0, 0.0, 0.0, 0.0]).expand(n, 4).clone(),
                     colors=torch.tensor(colour).expand(n, 3).clone())


def blob(center, radius, colour, n=1500, seed=0) -> Gaussians:
    """A round cloud of small Gaussians with random orientations: [n, ...]."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(n, 3, generator=generator) * radius / 2 + torch.tensor(center)
    quats = torch.nn.functional.normalize(torch.randn(n, 4, generator=generator), dim=-1)
    return Gaussians(means=means, opacities=torch.full((n,), 0.9), scales=torch.full((n, 3), radius / 8),
                     quats=quats, colors=torch.tensor(colour).expand(n, 3).clone())


def colourful_scene() -> Gaussians:
    """About 3 500 Gaussians: three panels side by side and a blob above them, at z 4."""
    return Gaussians.cat([panel((-1.3, 0.4, 4.0), 1.1, SCENE_COLOURS["red"]),
                          panel((0.0, 0.4, 4.0), 1.1, SCENE_COLOURS["green"]),
                          panel((1.3, 0.4, 4.0), 1.1, SCENE_COLOURS["blue"]),
                          blob((0.0, -0.9, 4.0), 0.6, SCENE_COLOURS["yellow"])])


def look_at_c2w(eye, target, up=(0.0, -1.0, 0.0)) -> np.ndarray:
    """[4, 4] OpenCV camera-to-world at `eye` looking at `target` (y down in the image)."""
    eye, target = np.asarray(eye, float), np.asarray(target, float)
    forward = (target - eye) / np.linalg.norm(target - eye)
    right = np.cross(forward, -np.asarray(up, float))
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    c2w = np.eye(4)
    c2w[:3, :3] = np.stack([right, down, forward], 1)
    c2w[:3, 3] = eye
    return c2w


def write_scene(folder: Path, name: str = "gaussians.ply") -> Path:
    """The colourful scene as a PLY with a cameras file (two cameras, grey images) beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    ply = folder / name
    save_ply(colourful_scene(), ply)
    c2w = np.stack([np.eye(4), look_at_c2w((2.5, -0.5, 0.5), (0.0, 0.0, 4.0))])
    intrinsics = np.array([[300.0, 300.0, 160.0, 120.0]] * 2)
    images = np.linspace(0.3, 0.6, 320)[None, None, None, :].repeat(3, 1).repeat(240, 2).repeat(2, 0)  # [2, 3, 240, 320]
    write_cameras(cameras_path_for(ply), c2w, intrinsics, images)
    return ply


# ---------------------------------------------------------------------------------------------
# Reading screenshots
# ---------------------------------------------------------------------------------------------

def colour_fractions(image: np.ndarray) -> dict[str, float]:
    """image [H, W, 3] uint8 -> the fraction of its pixels within COLOUR_TOLERANCE of each scene colour."""
    pixels = image.reshape(-1, 3).astype(np.float32)
    return {name: float((np.linalg.norm(pixels - 255.0 * np.array(rgb), axis=1) < COLOUR_TOLERANCE).mean())
            for name, rgb in SCENE_COLOURS.items()}


def shows_scene(image: np.ndarray) -> bool:
    fractions = colour_fractions(image)
    return min(fractions.values()) >= MIN_COLOUR_FRACTION and sum(fractions.values()) >= MIN_SCENE_FRACTION


def non_background_fraction(image: np.ndarray) -> float:
    """The fraction of pixels [H, W, 3] unlike the most common colour (the page's background) by more than 30."""
    colours, counts = np.unique(image.reshape(-1, 3), axis=0, return_counts=True)
    background = colours[np.argmax(counts)].astype(np.int16)
    return float((np.abs(image.astype(np.int16) - background).max(-1) > 30).mean())


def changed_fraction(a: np.ndarray, b: np.ndarray) -> float:
    """The fraction of pixels whose colour differs by more than 40 (of 255) in some channel."""
    return float((np.abs(a.astype(np.int16) - b.astype(np.int16)).max(-1) > 40).mean())


# ---------------------------------------------------------------------------------------------
# Headless Chromium through the DevTools protocol
# ---------------------------------------------------------------------------------------------

def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


def poll(condition, deadline_s: float, interval_s: float = 0.1):
    """condition() until it returns something truthy (returned) or deadline_s pass (None)."""
    end = time.monotonic() + deadline_s
    while True:
        value = condition()
        if value or time.monotonic() > end:
            return value or None
        time.sleep(interval_s)


class Chromium:
    """A headless Chromium driven through the DevTools protocol: one tab per URL, attached with a
    flat session (which follows the tab across the cross-process navigation to the page)."""

    def __init__(self, executable: str, profile: Path, log: Path):
        from websockets.sync.client import connect

        self.log = log
        with open(log, "wb") as stderr:  # the child keeps its own copy of the handle
            self.process = subprocess.Popen(
                [executable, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
                 "--remote-debugging-port=0", "about:blank"],
                stdout=subprocess.DEVNULL, stderr=stderr)
        # Chromium writes its DevTools port and browser endpoint into the profile once it listens
        active = profile / "DevToolsActivePort"
        lines = poll(lambda: active.is_file() and len(active.read_text().split()) == 2 and active.read_text().split(), 20)
        assert lines, f"Chromium did not start DevTools within 20 s; its log:\n{self.log_tail()}"
        self.socket = connect(f"ws://127.0.0.1:{lines[0]}{lines[1]}", max_size=None, open_timeout=10)
        self.next_id = 0

    def call(self, method: str, session: str | None = None, **params) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        self.socket.send(json.dumps(message | ({"sessionId": session} if session else {})))
        while True:  # events arrive in between; the answer carries our id
            answer = json.loads(self.socket.recv(timeout=30))
            if answer.get("id") == self.next_id:
                assert "error" not in answer, f"{method}: {answer['error']}"
                return answer["result"]

    def screenshot(self, session: str) -> np.ndarray:
        """The tab as it is drawn now: [H, W, 3] uint8."""
        data = base64.b64decode(self.call("Page.captureScreenshot", session, format="png")["data"])
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    def open_and_wait(self, url: str, drawn, deadline_s: float) -> tuple[np.ndarray, float]:
        """Open `url` in a new tab, take screenshots until drawn(screenshot), close the tab
        -> (the last screenshot, seconds from opening to it)."""
        start = time.monotonic()
        target = self.call("Target.createTarget", url=url, newWindow=True, width=WINDOW[0], height=WINDOW[1])["targetId"]
        session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        try:
            shots = []
            poll(lambda: shots.append(self.screenshot(session)) or drawn(shots[-1]), deadline_s, interval_s=0.2)
            return shots[-1], time.monotonic() - start
        finally:
            self.call("Target.closeTarget", targetId=target)

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.is_file() else ""

    def close(self) -> None:
        if getattr(self, "socket", None) is not None:
            self.socket.close()
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except OSError:
        return None


def run_view(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tokengs.view", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


# ---------------------------------------------------------------------------------------------
# The viewer in a browser
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`python -m tokengs.view` on the colourful scene: (its URL, seconds until it answered HTTP, its stdout file)."""
    folder = tmp_path_factory.mktemp("view_scene")
    ply = write_scene(folder)
    port = free_port()
    stdout = folder / "viewer.out"
    start = time.monotonic()
    with open(stdout, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "tokengs.view", str(ply), "--port", str(port), "--host", "127.0.0.1"],
                                   cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        answered = poll(lambda: http_status(url) == 200 or process.poll() is not None, HTTP_DEADLINE_S + 5, 0.05)
        seconds = time.monotonic() - start
        assert process.poll() is None, f"the viewer exited ({process.returncode}):\n{stdout.read_text()}"
        assert answered, f"the viewer did not answer HTTP within {HTTP_DEADLINE_S + 5} s:\n{stdout.read_text()}"
        yield url, seconds, stdout
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    executable = find_chromium()
    if executable is None:
        pytest.skip("no Chromium found (chromium, chromium-browser, google-chrome, /usr/bin/chromium): "
                    "`apt-get install -y chromium` (.ci/run does it)")
    folder = tmp_path_factory.mktemp("chromium")
    chromium = Chromium(executable, folder / "profile", folder / "chromium.log")
    yield chromium
    chromium.close()


@pytest.fixture(scope="module")
def first_screenshot(browser, served):
    """The page at the viewer's starting view (from just behind the scene's first camera), once drawn."""
    url, _, _ = served
    image, seconds = browser.open_and_wait(url, shows_scene, DRAW_DEADLINE_S)
    return image, seconds


def test_viewer_serves_and_the_browser_draws_the_scene(browser, served, first_screenshot):
    url, http_seconds, stdout = served
    image, draw_seconds = first_screenshot
    Image.fromarray(image).save(SCREENSHOT_COPY)
    fractions = colour_fractions(image)
    print(f"HTTP after {http_seconds:.1f} s, drawn {draw_seconds:.1f} s after opening; colour fractions "
          + ", ".join(f"{k} {v:.3f}" for k, v in fractions.items()))
    assert http_seconds < HTTP_DEADLINE_S, f"the viewer answered HTTP only after {http_seconds:.1f} s"
    line = stdout.read_text()
    assert f"at http://127.0.0.1:{url.rsplit(':', 1)[1]}" in line and "2 cameras" in line, line
    assert non_background_fraction(image) > MIN_SCENE_FRACTION, "the screenshot is blank or only background"
    assert shows_scene(image), (f"the screenshot ({SCREENSHOT_COPY}) does not show the scene's colours: fractions "
                                f"{fractions}, each must reach {MIN_COLOUR_FRACTION} and all {MIN_SCENE_FRACTION}; "
                                f"Chromium's log:\n{browser.log_tail()}")


def test_another_camera_shows_another_picture(browser, served, first_screenshot):
    url, _, _ = served
    first, _ = first_screenshot
    # viser reads the starting camera from the URL (world coordinates), ahead of the server's
    side = "?initialCameraPosition=5.0,-1.0,1.5&initialCameraLookAt=0.0,0.0,4.0&initialCameraUp=0.0,-1.0,0.0"

    def drawn_elsewhere(image: np.ndarray) -> bool:
        visible = sum(f >= MIN_COLOUR_FRACTION / 2 for f in colour_fractions(image).values())
        return visible >= 2 and changed_fraction(first, image) > 0.05

    image, seconds = browser.open_and_wait(url + "/" + side, drawn_elsewhere, DRAW_DEADLINE_S)
    Image.fromarray(image).save(SIDE_SCREENSHOT_COPY)
    print(f"side view drawn {seconds:.1f} s after opening; changed {changed_fraction(first, image):.3f}; "
          f"colour fractions {colour_fractions(image)}")
    assert drawn_elsewhere(image), (f"the side view does not differ from the first view (changed fraction "
                                    f"{changed_fraction(first, image):.3f}) or misses the scene: {colour_fractions(image)}")


# ---------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit status 2, no server
# ---------------------------------------------------------------------------------------------

def one_line_error(capsys, argv) -> str:
    code = view.main(argv)
    captured = capsys.readouterr()
    assert code == 2, (code, captured)
    assert captured.out == "" and captured.err.count("\n") == 1 and captured.err.startswith("tokengs-view: "), captured
    return captured.err


def test_missing_ply(capsys, tmp_path):
    missing = tmp_path / "nothing.ply"
    assert str(missing) in one_line_error(capsys, [str(missing)])


def test_missing_ply_from_the_command_line(tmp_path):
    """The real command: exit status 2 and one line, before any server starts."""
    result = run_view(str(tmp_path / "nothing.ply"), "--port", str(free_port()))
    assert result.returncode == 2 and result.stdout == "", result
    assert result.stderr.count("\n") == 1 and "does not exist" in result.stderr, result.stderr


@pytest.mark.parametrize("damage", ["garbage", "truncated", "not_3dgs"])
def test_corrupt_ply(capsys, tmp_path, damage):
    ply = write_scene(tmp_path)
    if damage == "garbage":
        ply.write_bytes(os.urandom(4096))
    elif damage == "truncated":
        ply.write_bytes(ply.read_bytes()[:5000])
    else:  # a point cloud, not Gaussians
        ply.write_bytes(b"ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\nproperty float y\n"
                        b"property float z\nend_header\n0 0 0\n")
    error = one_line_error(capsys, [str(ply)])
    assert str(ply) in error and "save_ply" in error, error


def test_folder_with_nothing_viewable(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("no scene here")
    error = one_line_error(capsys, [str(tmp_path)])
    assert str(tmp_path) in error and "no .ply" in error, error


def test_port_in_use(capsys, tmp_path):
    ply = write_scene(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        error = one_line_error(capsys, [str(ply), "--port", str(port), "--host", "127.0.0.1"])
    assert f"port {port}" in error and "--port" in error, error


def test_without_viser_names_the_install_command(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "viser", None)  # `import viser` now raises ImportError
    error = one_line_error(capsys, [str(write_scene(tmp_path))])
    assert 'pip install -e ".[viewer]"' in error, error
    # the commands' "look at it" lines say to install it only where it is missing
    assert view.view_command(tmp_path) == f'python -m tokengs.view {tmp_path}  (pip install -e ".[viewer]" first)'
    monkeypatch.delitem(sys.modules, "viser")
    installed = importlib.util.find_spec("viser") is not None
    assert (view.view_command(tmp_path) == f"python -m tokengs.view {tmp_path}") == installed


# ---------------------------------------------------------------------------------------------
# Folders, cameras, tracks
# ---------------------------------------------------------------------------------------------

def test_cameras_file_round_trip(tmp_path):
    ply = write_scene(tmp_path)
    cameras = read_cameras(cameras_path_for(ply))
    assert [c.name for c in cameras] == ["view_00", "view_01"]
    assert np.allclose(cameras[0].c2w, np.eye(4)) and (cameras[1].width, cameras[1].height) == (320, 240)
    assert cameras[0].image.is_file() and abs(cameras[0].vertical_fov - 2 * np.arctan(120 / 300)) < 1e-9


def test_folders_of_the_project_list_their_scenes(tmp_path):
    """The demo's workspace: scene.ply on top, evaluation dumps below; a corrupt one is left out."""
    write_scene(tmp_path, "scene.ply")
    for run in ("eval", "eval_ttt"):
        write_scene(tmp_path / run / "gaussians", "gaussians_0-0-0.ply")
    (tmp_path / "eval" / "gaussians" / "gaussians_1-0-0.ply").write_bytes(b"not a ply")
    found = view.find_scenes(tmp_path)
    assert [s.name for s in found][0] == "scene.ply" and len(found) == 4
    assert all(s.cameras is not None for s in found if "1-0-0" not in s.name)
    kept, first = view.load_first(found, tmp_path)
    assert first.source.name == "scene.ply" and len(kept) == 3 and len(first.cameras) == 2
    assert first.splats.rgbs.min() >= 0 and first.splats.rgbs.max() <= 1 and first.splats.opacities.shape[1] == 1


def dynamic_scene(folder: Path, frames: int = 4) -> tuple[Path, np.ndarray]:
    """A PLY written at time 1 of tracks that move its yellow blob along +x -> (the PLY, means [T, N_dyn, 3])."""
    gaussians = colourful_scene()
    dynamic = torch.arange(gaussians.num_gaussians - 1500, gaussians.num_gaussians)  # the blob
    shifts = torch.tensor([[0.2 * t, 0.0, 0.0] for t in range(frames)])
    means = gaussians.means[dynamic][None] + shifts[:, None] - shifts[1]  # time 1 is where the PLY has them
    gaussians.means[dynamic] = means[1]
    ply = folder / "gaussians.ply"
    save_ply(gaussians, ply)
    np.savez(folder / "tracks.npz", means=means.numpy(), frames=np.arange(10, 10 + frames),
             opacities=np.full((frames, len(dynamic)), 0.9, np.float32),
             colors=gaussians.colors[dynamic][None].repeat(frames, 1, 1).numpy())
    return ply, means.numpy()


@pytest.mark.parametrize("given_rows", [False, True], ids=["matched_by_position", "given_ply_rows"])
def test_tracks_are_matched_to_the_ply(tmp_path, given_rows):
    ply, means = dynamic_scene(tmp_path)
    if given_rows:  # the writer names the rows and the time the PLY was written at: no matching by position
        n = view.read_splats(ply).centers.shape[0]
        np.savez(tmp_path / "tracks.npz", means=means, ply_rows=np.arange(n - means.shape[1], n), ply_time=1)
    scene = view.load_scene(view.find_scenes(ply)[0])
    assert scene.tracks is not None and scene.tracks.start == 1 and len(scene.tracks.rows) == means.shape[1]
    assert np.array_equal(scene.splats.centers[scene.tracks.rows], means[1])


@contextlib.contextmanager
def viewer_on(path: Path):
    """A Viewer of `path` in this process, on a viser server of its own (no browser)."""
    import viser

    kept, first = view.load_first(view.find_scenes(path), path)
    server = viser.ViserServer(host="127.0.0.1", port=free_port(), verbose=False)
    viewer = None
    try:
        viewer = view.Viewer(server, kept, first)
        yield viewer
    finally:
        if viewer is not None:
            viewer.close()  # stop playing before the connections close
        server.stop()


def test_time_slider_moves_the_tracked_gaussians(tmp_path):
    """Moving the slider moves the dynamic splats, not the rest; playing moves it."""
    ply, means = dynamic_scene(tmp_path)
    with viewer_on(ply) as viewer:
        assert viewer.time_slider is not None and viewer.time_slider.value == 1
        static_before = viewer.static.centers.copy()
        viewer.time_slider.value = 3  # what a browser's slider does; viser runs the callback
        assert np.allclose(viewer.dynamic.centers, means[3])
        assert np.array_equal(viewer.static.centers, static_before)
        assert viewer.frame_label.content == "frame 13"
        viewer.play.value = True  # playing advances the slider (and wraps around at the end)
        assert poll(lambda: viewer.time_slider.value == 0, 5), "playing did not advance the time slider"
        assert np.allclose(viewer.dynamic.centers, means[0])


def test_dropdown_switches_scenes(tmp_path):
    """A folder of several PLYs (an evaluation workspace): the dropdown replaces the drawn scene."""
    write_scene(tmp_path / "gaussians", "gaussians_0-0-0.ply")
    save_ply(panel((0.0, 0.0, 3.0), 0.5, SCENE_COLOURS["red"]), tmp_path / "gaussians" / "gaussians_1-0-0.ply")
    with viewer_on(tmp_path) as viewer:
        assert viewer.dropdown.options == ("gaussians/gaussians_0-0-0.ply", "gaussians/gaussians_1-0-0.ply")
        assert viewer.show_cameras.visible
        viewer.dropdown.value = "gaussians/gaussians_1-0-0.ply"
        assert viewer.current.source.name == "gaussians/gaussians_1-0-0.ply" and not viewer.current.cameras
        assert len(viewer.static.centers) == len(view.read_splats(tmp_path / "gaussians" / "gaussians_1-0-0.ply").centers)
        assert not viewer.show_cameras.visible  # nothing to show or hide
