"""The benchmark scripts still run against the library (a smoke run on a tiny model and the shipped sample)."""

from __future__ import annotations

from pathlib import Path

from conftest import load_script

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE = REPO_ROOT / "peft_softmix" / "data" / "sample"


def load(name: str):
    return load_script(REPO_ROOT / "benchmarks" / f"{name}.py")


def test_speed_benchmark_times_every_training_case_and_reports_the_ratios():
    speed = load("speed")
    argv = ["--preset", "tiny", "--device", "cpu", "--ks", "1", "2", "--repeats", "1", "--warmup", "0"]
    summary = speed.main([*argv, "--skip", "eval", "trex", "--data_dir", str(SAMPLE)])
    for key in (
        "mixture_step_over_bare_k1_shallow",
        "mixture_step_over_bare_k2_deep",
        "batched_over_kloop_speedup_k2_shallow",
        "mixture_k1_over_peft_prompt_tuning",
    ):
        assert summary[key] > 0, key


def test_profile_step_counts_operators_for_bare_and_mixture():
    profile_step = load("profile_step")
    summary = profile_step.main(["--device", "cpu", "--k", "2", "--repeats", "1", "--data_dir", str(SAMPLE)])
    # the mixture runs the bare model's operators and its own on top
    assert summary["shallow"]["aten_ops"] > summary["bare"]["aten_ops"] > 0
    assert summary["deep"]["aten_ops"] > summary["shallow"]["aten_ops"]


def test_memory_step_reports_a_peak_for_shallow_and_deep_prompts():
    memory_step = load("memory_step")
    for case in ("shallow", "deep"):
        result = memory_step.main(["--case", case, "--k", "2", "--preset", "tiny", "--data_dir", str(SAMPLE)])
        assert result["case"] == case and result["batch"][:2] == (32, 2) and result["peak_mib"] >= 0
