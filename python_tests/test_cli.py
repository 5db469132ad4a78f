"""Command line (issue 5): every command end to end with --fast, and one-line errors with a non-zero exit."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from prunepath_ops.__main__ import build_parser, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ckpt") / "c")
    assert main(["convert", "--fast", "--no-progress", "--out", out]) == 0
    return out


def test_every_command_has_help(capsys):
    for cmd in ("demo", "convert", "train", "calibrate", "eval", "generate", "bench", "info"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert "usage: prunepath" in capsys.readouterr().out
    assert set(build_parser()._subparsers._group_actions[0].choices) >= {"demo", "eval", "bench"}


def test_demo_default_stays_fast(capsys):
    assert main(["demo", "--hidden", "64", "--ffn", "128", "--tokens", "8"]) == 0
    assert "s_FFN" in capsys.readouterr().out


def test_convert_calibrate_eval_generate_fast(ckpt, tmp_path, capsys):
    assert os.path.isfile(os.path.join(ckpt, "prunepath_config.json"))
    assert main(["calibrate", "--fast", "--checkpoint", ckpt, "--target", "0.5", "--out", str(tmp_path / "cal")]) == 0
    measured = float(capsys.readouterr().out.split("measured s_FFN ")[1].split()[0])
    assert abs(measured - 0.5) <= 0.01
    assert main(["calibrate", "--fast", "--checkpoint", ckpt, "--target", "0.4", "--per-layer",
                 "--out", str(tmp_path / "cal2")]) == 0  # fmt: skip
    out_dir = tmp_path / "ev"
    argv = ["eval", "--fast", "--no-progress", "--checkpoint", ckpt, "--taus", "1.05,0.8", "--ks", "4",
            "--static-fractions", "0.5", "--static-methods", "wanda,magnitude", "--max-tokens", "200",
            "--out-dir", str(out_dir)]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| prunepath | tau=0.8 |" in out and "| topk | k=4 | 0.500 |" in out and "static-magnitude" in out
    assert (out_dir / "sweep.md").is_file() and (out_dir / "sweep.csv").is_file()
    if (out_dir / "sweep.png").exists():
        assert (out_dir / "sweep.png").stat().st_size > 0
    assert main(["generate", "--fast", "--checkpoint", ckpt, "--tau", "0.7", "--max-new-tokens", "5"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("The capital of France is") and "s_FFN" in captured.err


def test_eval_min_experts_floor(ckpt, tmp_path, capsys):
    argv = ["eval", "--fast", "--no-progress", "--checkpoint", ckpt, "--taus", "0.05", "--ks", "2",
            "--static-fractions", "", "--max-tokens", "120", "--out-dir", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    plain = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| prunepath | tau=0.05 |")]
    assert main([*argv, "--min-experts", "2"]) == 0
    out = capsys.readouterr().out
    floored = [line for line in out.splitlines() if line.startswith("| prunepath | tau=0.05,min=2 |")]
    topk = [line for line in out.splitlines() if line.startswith("| topk | k=2 |")]
    assert len(plain) == len(floored) == len(topk) == 1
    s_plain, s_floor, s_topk = (float(r.split("|")[3]) for r in (plain[0], floored[0], topk[0]))
    # tau = 0.05 keeps only the top expert; the floor keeps two, exactly top-2.
    assert s_floor < s_plain and s_floor == pytest.approx(s_topk)
    with pytest.raises(SystemExit):  # argparse: not an integer
        main([*argv, "--min-experts", "x"])
    capsys.readouterr()
    assert main([*argv, "--min-experts", "0"]) == 1
    assert "bad --min-experts" in _error_line(capsys)


def test_eval_max_experts_cap(ckpt, tmp_path, capsys):
    argv = ["eval", "--fast", "--no-progress", "--checkpoint", ckpt, "--taus", "1.05", "--ks", "2",
            "--static-fractions", "", "--max-tokens", "120", "--out-dir", str(tmp_path)]  # fmt: skip
    assert main([*argv, "--max-experts", "2"]) == 0
    out = capsys.readouterr().out
    capped = [line for line in out.splitlines() if line.startswith("| prunepath | tau=1.05,max=2 |")]
    topk = [line for line in out.splitlines() if line.startswith("| topk | k=2 |")]
    assert len(capped) == len(topk) == 1
    # tau >= 1 keeps every expert; the cap keeps two, exactly top-2 (same sparsity and perplexity).
    assert capped[0].split("|")[3:5] == topk[0].split("|")[3:5]
    assert main([*argv, "--max-experts", "0"]) == 1
    assert "bad --max-experts" in _error_line(capsys)
    assert main([*argv, "--min-experts", "3", "--max-experts", "2"]) == 1  # cap below the floor
    assert "bad --max-experts" in _error_line(capsys)


def test_eval_dense_only_and_bench_and_info(tmp_path, capsys):
    argv = ["eval", "--fast", "--no-progress", "--static-fractions", "0.5", "--max-tokens", "150",
            "--out-dir", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    assert "| dense |" in capsys.readouterr().out
    assert main(["bench", "--fast", "--seconds", "0.01"]) == 0
    assert "speed-up" in capsys.readouterr().out
    assert main(["info"]) == 0


@pytest.mark.parametrize(
    "extra",
    [
        [],  # the checkpoint's gate
        ["--gate", "one", "--straight-through"],  # gates of value 1 that still train the routers
        ["--eta", "0.05", "--lam", "0.01"],  # auxiliary loss weights other than the paper's
    ],
)
def test_train_fast(ckpt, tmp_path, capsys, extra):
    pytest.importorskip("prunepath_ops.train")
    out = str(tmp_path / "trained")
    argv = ["train", "--fast", "--no-progress", "--checkpoint", ckpt, "--steps", "2", "--seq-len", "32",
            "--batch-size", "1", "--out", out, *extra]  # fmt: skip
    assert main(argv) == 0
    assert os.path.isfile(os.path.join(out, "prunepath.safetensors"))


def test_train_under_expert_bounds_saves_them(ckpt, tmp_path, capsys):
    # --min/--max-experts bound the routing during training and travel with the checkpoint.
    pytest.importorskip("prunepath_ops.train")
    from prunepath_ops.convert import load_checkpoint

    out = str(tmp_path / "banded")
    argv = ["train", "--fast", "--no-progress", "--checkpoint", ckpt, "--steps", "2", "--seq-len", "32",
            "--batch-size", "1", "--min-experts", "2", "--max-experts", "3", "--out", out]  # fmt: skip
    assert main(argv) == 0
    mlps = list(load_checkpoint(out).modules.values())
    assert mlps and all((m.min_experts, m.max_experts) == (2, 3) for m in mlps)
    assert main([*argv[:-2], "--max-experts", "0"]) == 1
    assert "bad --max-experts" in _error_line(capsys)


def test_train_backbone_is_saved_and_restored(ckpt, tmp_path, capsys):
    # --train-backbone moves attention, norms and embeddings too: the checkpoint must carry them,
    # or the evaluated model would pair fine-tuned FFNs with the source model's attention.
    pytest.importorskip("prunepath_ops.train")
    import torch

    from prunepath_ops.__main__ import _load_prunepath
    from prunepath_ops.convert import backbone_parameters, load_checkpoint

    out = str(tmp_path / "bb")
    argv = ["train", "--fast", "--no-progress", "--device", "cpu", "--checkpoint", ckpt, "--steps", "2",
            "--seq-len", "32", "--batch-size", "1", "--train-backbone", "--lr-backbone", "1e-2",
            "--distill", "0.5", "--tau-sampling", "uniform", "--grad-accum", "2", "--eval-every", "1",
            "--val-fraction", "0.2", "--val-sparsities", "0.3", "--out", out]  # fmt: skip
    assert main(argv) == 0
    assert "validation: best mean CE" in capsys.readouterr().out
    import json

    with open(os.path.join(out, "train_history.json")) as f:
        history = json.load(f)
    assert [v[0] for v in history["validation"]] == [1, 2] and history["best_step"] in (1, 2)
    saved = load_checkpoint(out).backbone
    assert saved and "embed.weight" in saved and not any(".ffn." in n for n in saved)
    source, _, _ = _load_prunepath(ckpt, None, True)
    trained, _, _ = _load_prunepath(out, None, True)
    before, after = backbone_parameters(source), backbone_parameters(trained)
    assert set(after) == set(saved)
    assert all(torch.equal(after[n], saved[n]) for n in saved)
    assert any(not torch.equal(before[n], after[n]) for n in saved)  # it trained, and it came back
    # Training again from that checkpoint keeps its backbone even without --train-backbone.
    again = str(tmp_path / "again")
    assert main(["train", "--fast", "--no-progress", "--checkpoint", out, "--steps", "1", "--seq-len", "16",
                 "--batch-size", "1", "--out", again]) == 0  # fmt: skip
    assert all(torch.equal(load_checkpoint(again).backbone[n], saved[n]) for n in saved)


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--distill", "2"], "--distill must be in [0, 1]"),  # a weight, not a temperature
        (["--grad-accum", "0"], "--grad-accum must be >= 1"),
        (["--eval-every", "1", "--val-fraction", "1.5"], "--val-fraction must be in (0, 1)"),
        (["--eval-every", "-1"], "--eval-every must be >= 0"),
        (["--eval-every", "1", "--val-sparsities", "1.0"], "--val-sparsities must be s_FFN targets"),
        (["--eval-every", "1", "--val-sparsities", "half"], "--val-sparsities must be a comma list"),
        (["--device", "tpu"], "bad --device"),  # neither cpu nor cuda
        (["--device", "banana"], "bad --device"),  # not a device string
    ],
)
def test_train_bad_options(ckpt, capsys, argv, match):
    assert main(["train", "--fast", "--no-progress", "--checkpoint", ckpt, "--steps", "1", *argv]) == 1
    assert match in _error_line(capsys)


def test_device_cuda_without_gpu(ckpt, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["generate", "--fast", "--device", "cuda", "--max-new-tokens", "2"]) == 1
    assert "sees no CUDA GPU" in _error_line(capsys)


def test_train_rejects_negative_loss_weights(ckpt, capsys):
    argv = ["train", "--fast", "--no-progress", "--checkpoint", ckpt, "--steps", "1", "--eta", "-1"]
    assert main(argv) == 1
    assert "--eta and --lam must be non-negative" in _error_line(capsys)


def test_straight_through_needs_gate_one(ckpt, capsys):
    argv = ["train", "--fast", "--no-progress", "--checkpoint", ckpt, "--steps", "1", "--gate", "sigmoid",
            "--straight-through"]  # fmt: skip
    assert main(argv) == 1
    assert "--straight-through needs gate 'one'" in _error_line(capsys)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1
    return err


@pytest.mark.parametrize(
    "argv,match",
    [
        (["eval", "--model", "/nonexistent/model.gguf"], "model file not found"),
        (["generate", "--fast", "--checkpoint", "/nonexistent/ckpt"], "checkpoint directory not found"),
        (["eval", "--fast", "--text", "/nonexistent/text.txt"], "text file not found"),
        (["generate", "--fast", "--tau", "-0.5"], "bad --tau"),
        (["generate", "--fast", "--tau", "nan"], "bad --tau"),
        (["eval", "--fast", "--taus", "1.05,7"], "bad --tau"),
        (["demo", "--ffn", "100"], "multiple of --expert-width"),
    ],
)
def test_errors_are_one_line(argv, match, capsys):
    assert main(argv) == 1
    assert match in _error_line(capsys)


def test_unloadable_model(tmp_path, capsys):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"this is not a gguf file" * 10)
    assert main(["generate", "--model", str(bad)]) == 1
    assert "cannot load model" in _error_line(capsys)


@pytest.mark.parametrize("target", ["1.5", "-0.1", "0.99"])
def test_impossible_target(ckpt, target, capsys):
    # 0.99 > 1 - 1/8 = 0.875, the most a tau can give with 8 experts and min_experts 1
    assert main(["calibrate", "--fast", "--checkpoint", ckpt, "--target", target]) == 1
    assert "impossible target sparsity" in _error_line(capsys)


def test_python_m_entry_point(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    ok = subprocess.run([sys.executable, "-m", "prunepath_ops", "generate", "--fast", "--max-new-tokens", "3"],
                        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([sys.executable, "-m", "prunepath_ops", "generate", "--fast", "--tau", "2"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)  # fmt: skip
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and "bad --tau" in bad.stderr
