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
    summary = speed.main([*argv, "--skip", "eval", "candidates", "causal", "trex", "--data_dir", str(SAMPLE)])
    for key in (
        "mixture_step_over_bare_k1_shallow",
        "mixture_step_over_bare_k2_deep",
        "batched_over_kloop_speedup_k2_shallow",
        "mixture_k1_over_peft_prompt_tuning",
    ):
        assert summary[key] > 0, key


def test_speed_benchmark_ranks_candidates_of_every_length_against_single_token_eval():
    speed = load("speed")
    argv = ["--preset", "tiny", "--device", "cpu", "--ks", "1", "--repeats", "1", "--warmup", "0"]
    argv += ["--eval_facts", "8", "--eval_repeats", "1", "--eval_k", "2"]
    summary = speed.main([*argv, "--skip", "train", "eval", "causal", "trex", "--data_dir", str(SAMPLE)])
    info = summary["candidates"]
    assert sum(info["candidate_lengths"].values()) == info["candidates"] > 0
    for key in ("cand_rank_all_over_single_token_eval", "cand_rank_all_over_one_per_length"):
        assert summary[key] > 0, key
    assert summary["cand_rank_all_facts_per_s"] > 0


def test_speed_benchmark_times_a_causal_lm_against_its_floor_and_a_naive_candidate_loop():
    speed = load("speed")
    argv = ["--device", "cpu", "--repeats", "1", "--warmup", "0", "--eval_facts", "4", "--batch_facts", "4"]
    argv += ["--eval_k", "2", "--causal_candidates", "5", "--eval_batch_facts", "4"]
    summary = speed.main([*argv, "--skip", "train", "eval", "candidates", "trex", "--data_dir", str(SAMPLE)])
    assert summary["causal"]["candidates"] == 5
    for key in ("causal_mixture_step_over_bare", "causal_naive_loop_over_cached_ranking"):
        assert summary[key] > 0, key


def test_causal_scoring_compares_prefix_and_whole_sentence_scoring():
    causal_scoring = load("causal_scoring")
    argv = ["--relations", "P176", "--max_train", "16", "--max_test", "6", "--epochs", "1", "--num_templates", "2"]
    summary = causal_scoring.main(argv)
    assert set(summary["macro_p@1"]) == {"hard_prefix", "hard_sentence", "soft_prefix", "soft_sentence"}
    assert all(0.0 <= value <= 100.0 for value in summary["macro_p@1"].values())


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
        assert result["case"] == case and result["batch"][0] == 32 * 2 and result["peak_mib"] >= 0


def test_steps_per_call_repeats_a_short_step_until_the_call_lasts_the_minimum():
    speed = load("speed")
    assert speed.steps_per_call(0.020, 0.150) == 8  # 7 steps would last 140 ms
    assert speed.steps_per_call(0.200, 0.150) == 1
    assert speed.steps_per_call(0.020, 0.0) == 1  # no minimum: one step per call, as on a CPU


def test_round_robin_timing_records_the_time_per_step_of_repeated_calls():
    speed = load("speed")
    events: list[tuple[str, str]] = []

    def case(name: str):
        return speed.Case(
            name, lambda: events.append(("run", name)), facts=1, setup=lambda: events.append(("setup", name))
        )

    cases = [case("first"), case("second")]
    speed.time_round_robin(cases, repeats=3, warmup=1, device=speed.torch.device("cpu"), min_call_s=0.05)
    steps = cases[0].info["steps_per_call"]
    # an empty step lasts microseconds, so one call repeats it many times
    assert steps > 1
    # warm-up, one step that sizes the calls, then 3 calls; setup once before each of them
    assert events.count(("run", "first")) == 1 + 1 + 3 * steps
    assert events.count(("setup", "first")) == 1 + 1 + 3
    # the cases share a model: every step runs in the state its own case's setup left
    state = None
    for kind, name in events:
        if kind == "setup":
            state = name
        else:
            assert state == name
    assert len(cases[0].times) == 3 and all(t < 0.05 for t in cases[0].times)


def test_deep_offsets_benchmark_times_both_designs_after_checking_they_agree():
    deep_offsets = load("deep_offsets")
    # main() raises if the two ways of adding offsets give different losses with random offsets
    summary = deep_offsets.main(
        [
            "--device",
            "cpu",
            "--preset",
            "tiny",
            "--ks",
            "2",
            "--repeats",
            "1",
            "--memory_k",
            "0",
            "--data_dir",
            str(SAMPLE),
        ]
    )
    for case in ("shallow", "deep_canvas", "deep_rows"):
        assert summary[f"k2_{case}_over_bare"] > 0
