"""Options: every release preset holds the release's values; validation; YAML round trip; CLI."""

import dataclasses
import importlib
import json
import re
import typing

import pytest

from tokengs.cli import parse_options
from tokengs.options import (DOMAINS, Options, OptionsError, config_defaults, config_doc, get_preset,
                             option_type_hints)
from conftest import SHARED, shared_file

PRESETS_JSON = SHARED / "presets.json"
PRESETS_MD = SHARED / "PRESETS.md"


def _release():
    return json.loads(shared_file(PRESETS_JSON).read_text())


def test_defaults_equal_release():
    release = _release()
    ours = Options().to_dict()
    for name, value in release["defaults"].items():
        assert name in ours, f"release field {name} missing"
        assert ours[name] == value, name


@pytest.mark.parametrize("preset", sorted(json.loads(PRESETS_JSON.read_text())["presets"]) if PRESETS_JSON.is_file() else [])
def test_release_preset_values(preset):
    release = _release()
    expected = dict(release["defaults"], **release["presets"][preset])
    ours = config_defaults[preset].to_dict()
    assert {k: ours[k] for k in expected} == expected


def test_presets_md_lists_every_preset():
    rows = [line for line in shared_file(PRESETS_MD).read_text().splitlines() if line.startswith("| `") and "=" in line]
    names = [row.split("`")[1] for row in rows]
    assert len(names) == 24
    for row, name in zip(rows, names):
        assert name in config_defaults
        # spot-check scalar values in the markdown too (independent of presets.json)
        for part in row.split("|")[3].split(", "):
            key, _, value = part.strip().partition("=")
            if key in ("lr", "num_views", "num_input_views", "enc_depth", "ttt_mode", "lambda_dyn_aux"):
                assert repr(getattr(config_defaults[name], key)).replace("'", "") == value.replace("'", "")


def test_every_preset_has_help():
    assert set(config_doc) == set(config_defaults)
    assert all(doc and "\n" not in doc for doc in config_doc.values())


def test_dec_patch_size_resolved():
    assert Options().dec_patch_size == 8
    assert Options(patch_size=16, img_size=(256, 256)).dec_patch_size == 16
    assert config_defaults["finetune_dl3dv_6view"].dec_patch_size == 8


def test_ours_presets_construct():
    for name in ("tiny", "tiny_eval", "tiny_latent", "tiny_kubric_dyn", "train_re10k", "eval_re10k"):
        assert config_defaults[name].img_size[0] % config_defaults[name].patch_size == 0
    assert config_defaults["train_re10k"].num_input_views == 2 and config_defaults["train_re10k"].img_size == (256, 256)


BAD = [
    (dict(img_size=(250, 256)), "img_size"),
    (dict(num_views=4, num_input_views=4), "num_views"),
    (dict(deferred_bp=True, mean_of_grads="per-scene"), "deferred_bp"),
    (dict(mean_of_grads="scene"), "mean_of_grads"),
    (dict(ttt_mode="weights"), "ttt_mode"),
    (dict(camera_normalization_method="median_cam"), "camera_normalization_method"),
    (dict(camera_scale_method="median"), "camera_scale_method"),
    (dict(bg_color="red"), "bg_color"),
    (dict(mean_of_grads_scene_chunk_size=0), "mean_of_grads_scene_chunk_size"),
    (dict(mean_of_grads_view_chunk_size=-1), "mean_of_grads_view_chunk_size"),
    (dict(use_multiscale_encoder=True, enc_depth=3), "multiscale_encoder_layers"),
    (dict(ttt_mode="scene-latent-tuning"), "ttt_mode"),
    (dict(ttt_mode="latents"), "ttt_mode"),
    (dict(num_dynamic_gs_tokens=2000, img_size=(256, 256)), "num_dynamic_gs_tokens"),
    (dict(evaluating=True, use_input_supervision=True), "use_input_supervision"),
    (dict(render_tile_size=64), "render_tile_size"),
    (dict(model_type="lvsm"), "model_type"),
    (dict(batch_size=0), "batch_size=0 is out of range: it must be an integer >= 1"),
    (dict(batch_size=-2), "batch_size"),
    (dict(num_epochs=0), "num_epochs"),  # a run of 0 steps would be marked COMPLETE with no checkpoint
    (dict(lr=0.0), "lr=0.0 is out of range: it must be a finite number > 0"),
    (dict(lr=-1e-4), "lr"),
    (dict(lr=float("nan")), "lr=nan"),
    (dict(ttt_lr=float("inf")), "ttt_lr"),
    (dict(print_freq=0), "print_freq"),
    (dict(seed=-1), "seed"),
    (dict(znear=1.0, zfar=0.5), "zfar=0.5 must lie beyond znear=1.0"),
    (dict(pointmap_trim_lo=0.9, pointmap_trim_hi=0.1), "pointmap_trim_lo"),
    (dict(num_views=2, num_input_views=3, use_input_supervision=True), "num_input_views=3 exceeds num_views=2"),
    (dict(enc_num_heads=5), "enc_embed_dim=1024 is not divisible by enc_num_heads=5"),
    (dict(time_embedding_dim=3), "time_embedding_dim"),
    (dict(img_size=(256,)), "img_size"),
    (dict(data_mode=(("dl3dv", 0),)), "data_mode"),
]


@pytest.mark.parametrize("changes,field", BAD)
def test_validation_on_construction_and_evolve(changes, field):
    with pytest.raises(OptionsError, match=field):
        Options(**changes)
    with pytest.raises(OptionsError, match=field):
        Options().evolve(**changes)


def numeric_fields() -> list[str]:
    numbers = {int, float, typing.Optional[int], typing.Optional[float]}
    return [name for name, hint in option_type_hints().items() if hint in numbers]


def test_every_numeric_option_has_a_domain_that_refuses_non_finite_and_negative_values():
    assert set(numeric_fields()) == set(DOMAINS)
    for name in numeric_fields():
        hint = option_type_hints()[name]
        bad = (-1,) if hint in (int, typing.Optional[int]) else (float("nan"), float("inf"), -float("inf"))
        if name in ("opacity_bias", "gaussian_z_offset"):  # any finite value
            bad = bad[:2] if bad != (-1,) else ()
        for value in bad:
            with pytest.raises(OptionsError, match=f"{name}="):
                Options().evolve(**{name: value})


def test_config_file_values_of_the_wrong_kind_name_the_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("img_size: abc\n")
    with pytest.raises(OptionsError, match=str(path)):
        Options.load_yaml(path)


def test_validation_allows_the_boundaries():
    Options(num_views=4, num_input_views=4, use_input_supervision=True)
    Options(evaluating=True, num_views=4, num_input_views=4)
    Options(num_dynamic_gs_tokens=1024, img_size=(256, 256))  # exactly the patch count
    Options(num_gs_tokens=5000)  # no dynamic tokens: no token/patch check
    Options(use_latent_bottleneck=True, ttt_mode="latents")
    Options(use_multiscale_encoder=True, enc_depth=12)


def test_evolve_unknown_field():
    with pytest.raises(OptionsError, match="unknown option"):
        Options().evolve(learning_rate=1.0)


def test_yaml_round_trip(tmp_path):
    for name in ("finetune_dl3dv_kubric_dyn_release", "eval_dl3dv_latent_6view_ssim", "tiny"):
        opt = config_defaults[name].evolve(lr=1.5e-4, dataset_kwargs={"root_path": "x"})
        path = tmp_path / f"{name}.yaml"
        opt.save_yaml(path)
        loaded = Options.load_yaml(path)
        assert loaded == opt
        assert dataclasses.asdict(loaded) == dataclasses.asdict(opt)


def test_yaml_errors_name_the_file(tmp_path):
    with pytest.raises(OptionsError, match="does not exist"):
        Options.load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 1\nlearnig_rate: 2\n")
    with pytest.raises(OptionsError, match="learnig_rate"):
        Options.load_yaml(bad)


def test_cli_preset_and_flags(tmp_path):
    opt = parse_options(["finetune_dl3dv_6view", "--lr", "1e-3", "--use_ttt_for_eval", "--no-random_reflect",
                         "--strict_checkpoint_loading", "False", "--dataset_kwargs", "root_path", "D",
                         "--data_mode", "dl3dv_scaled_0.15", "2", "re10k", "1"])
    assert opt == config_defaults["finetune_dl3dv_6view"].evolve(
        lr=1e-3, use_ttt_for_eval=True, random_reflect=False, strict_checkpoint_loading=False,
        dataset_kwargs={"root_path": "D"}, data_mode=(("dl3dv_scaled_0.15", 2), ("re10k", 1)))
    path = tmp_path / "config.yaml"
    opt.save_yaml(path)
    assert parse_options(["--config", str(path), "--num_epochs", "3"]) == opt.evolve(num_epochs=3, workspace=str(tmp_path))


@pytest.mark.parametrize("argv,needle", [
    (["finetune_dl3dv_6vew"], "unknown preset"),
    (["tiny", "--lrr", "1"], "did you mean --lr"),
    (["tiny", "--lr", "abc"], "--lr"),
    (["tiny", "--img_size", "30", "30"], "img_size"),
    (["tiny", "--config"], "--config"),
])
def test_cli_errors_one_line_exit_2(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_options(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


# ---- --help ------------------------------------------------------------------------------------

def help_text(entry_point, argv, capsys, monkeypatch) -> str:
    """What `argv` (ending in --help) prints, on a terminal wide enough to keep descriptions whole."""
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as exc:
        entry_point(argv)
    assert exc.value.code == 0
    return capsys.readouterr().out


def option_descriptions(text: str) -> dict[str, str]:
    """tyro's list of options -> {flag line: its description without the default}. A flag line is
    indented by 1-2 columns, its description lines by more (boxed on a UTF-8 terminal, plain else)."""
    descriptions, flag = {}, None
    for line in text.splitlines():
        row = line.rstrip().removesuffix("│").rstrip().removeprefix("│")
        content, indent = row.strip(), len(row) - len(row.lstrip())
        if re.match(r"-{1,2}[a-z]", content) and indent <= 2:
            flag = content
            descriptions[flag] = ""
        elif flag and content and indent > 2:
            descriptions[flag] += " " + content
        else:
            flag = None
    return {flag: re.sub(r"\(default: .*\)$", "", text).strip() for flag, text in descriptions.items()}


@pytest.mark.parametrize("module, preset", [("train", "tiny"), ("evaluate", "tiny_eval"),
                                            ("train", "finetune_dl3dv_kubric_dyn_release")])
def test_preset_help_describes_every_option_by_its_own_doc(module, preset, capsys, monkeypatch):
    entry_point = importlib.import_module(f"tokengs.{module}").main
    described = option_descriptions(help_text(entry_point, [preset, "--help"], capsys, monkeypatch))
    flags = {flag.split()[0].rstrip(",") for flag in described}
    assert {"--" + f.name for f in dataclasses.fields(Options)} <= flags  # spelled as the README spells them
    for flag, description in described.items():
        assert re.search(r"[A-Za-z]", description), f"{flag} has no description"
        assert "---" not in description, f"{flag} shows a section divider: {description}"
    docs = [d for flag, d in described.items() if not flag.startswith("-h")]
    assert len(set(docs)) == len(docs), "options share a description"


@pytest.mark.parametrize("module", ["train", "evaluate"])
def test_help_offers_a_preset_or_config_and_lists_both(module, capsys, monkeypatch):
    entry_point = importlib.import_module(f"tokengs.{module}").main
    text = help_text(entry_point, ["--help"], capsys, monkeypatch)
    usage = text.splitlines()[0]
    assert usage == f"usage: python -m tokengs.{module} (PRESET | --config FILE) [--OPTION VALUE ...]"
    assert "(required)" not in text
    assert re.search(r"^  --config FILE +\S", text, re.MULTILINE)
    assert all(re.search(rf"^  {name} +{re.escape(doc.split()[0])}", text, re.MULTILINE)
               for name, doc in config_doc.items())


def test_config_help_names_the_file_and_every_option(tmp_path, capsys, monkeypatch):
    path = tmp_path / "config.yaml"
    config_defaults["tiny"].save_yaml(path)
    text = help_text(parse_options, ["--config", str(path), "--help"], capsys, monkeypatch)
    assert text.startswith(f"usage: tokengs --config {path} ")
    assert option_descriptions(text)["--lr FLOAT"] == "Peak learning rate of AdamW's one-cycle schedule."


def test_extra_flags_are_listed_and_left_out_of_the_options(capsys, monkeypatch):
    extra = {"--trace_file": "Where the entry point writes its trace."}
    assert parse_options(["tiny", "--trace_file", "t.json", "--lr", "0.5"], extra_flags=extra) == \
        config_defaults["tiny"].evolve(lr=0.5)
    text = help_text(lambda argv: parse_options(argv, extra_flags=extra), ["--help"], capsys, monkeypatch)
    assert re.search(r"^  --trace_file +Where the entry point writes its trace\.", text, re.MULTILINE)


def test_dataset_kwargs_flag_changes_the_keys_it_names_and_keeps_the_others(tmp_path):
    opt = parse_options(["eval_dl3dv_6view", "--dataset_kwargs", "root_path", "/data/dl3dv_eval"])
    assert opt.dataset_kwargs == {"evaluation_json": "assets/evaluation_idx_dl3dv_depthsplat_6v.json",
                                  "root_path": "/data/dl3dv_eval"}
    config = tmp_path / "config.yaml"
    get_preset("tiny_eval").evolve(workspace=str(tmp_path)).save_yaml(config)
    opt = parse_options(["--config", str(config), "--dataset-kwargs", "evaluation_json", "J"])
    assert opt.dataset_kwargs == {"root_path": get_preset("tiny_eval").dataset_kwargs["root_path"],
                                  "evaluation_json": "J"}


def test_a_workspaces_config_names_the_folder_it_is_in_now(tmp_path):
    recorded, moved = tmp_path / "run", tmp_path / "run_moved"
    moved.mkdir()
    get_preset("tiny").evolve(workspace=str(recorded)).save_yaml(moved / "config.yaml")
    assert parse_options(["--config", str(moved / "config.yaml")]).workspace == str(moved)
    assert parse_options(["--config", str(moved / "config.yaml"), "--workspace", "elsewhere"]).workspace == "elsewhere"
    (moved / "config.yaml").rename(moved / "template.yaml")  # not a workspace's own file: its record stands
    assert parse_options(["--config", str(moved / "template.yaml")]).workspace == str(recorded)


def test_a_preset_beside_config_is_refused_in_one_line(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    get_preset("tiny_eval").save_yaml(config)
    with pytest.raises(SystemExit) as stop:
        parse_options(["tiny_eval", "--config", str(config)])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and line == (f"error: 'tiny_eval' with --config: the config file holds every option; "
                                             f"pass a preset or --config {config}, not both")
    config.write_text("lr: [1,\n  2\nseed: 3\n")  # broken YAML: its parser's message, on one line
    with pytest.raises(SystemExit):
        parse_options(["--config", str(config)])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: config file {config} is not valid YAML (")
