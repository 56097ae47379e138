"""The learning-runs report (``scripts/learning_runs.py``) without training: kept results of changed recipes are
left out, claims tables average over seeds and name the variants not run (issue 21)."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import learning_runs  # noqa: E402


def _result(recipe, seed, step0, final, z, **kw):
    return {"recipe": recipe, "seed": seed, "recipe_sha": learning_runs.recipe_sha(recipe), "extra_args": [],
            "reward_step0": step0, "reward_step0_se": 0.1, "reward_final": final, "reward_final_se": 0.1,
            "improvement": final - step0, "improvement_se": 0.01, "improvement_z": z, "learned": z >= 3,
            "drift_from_base": 0.005, "frechet_step0": 0.4, "frechet_final": 0.41, "kl_tag": "kl/total",
            "kl_last5_mean": 0.002, "steps": 20, "minutes": 1.5, "curve": [(0, step0), (20, final)], "curve_kl": [(0, 0.0), (19, 0.002)],
            "curves": {"heldout/reward/luminance": [(0, step0), (20, final)]}, **kw}


def test_kept_results_of_a_changed_recipe_are_left_out(tmp_path, capsys):
    (tmp_path / "results").mkdir()
    json.dump(_result("flow_grpo", 0, 4.0, 4.1, 10.0), open(tmp_path / "results" / "flow_grpo_seed0.json", "w"))
    json.dump({**_result("sage_grpo", 0, 4.0, 4.1, 10.0), "recipe_sha": "0" * 16}, open(tmp_path / "results" / "sage_grpo_seed0.json", "w"))
    kept = learning_runs.kept_results(str(tmp_path))
    assert [(r["recipe"], r["seed"]) for r in kept] == [("flow_grpo", 0)]
    assert "sage_grpo_seed0.json: the recipe changed" in capsys.readouterr().out


def test_claim_table_means_and_spread_over_seeds_and_names_variants_not_run():
    claim = {"title": "T", "seeds": [0, 1], "metric": "heldout/reward/luminance",
             "variants": [{"name": "A", "recipe": "flow_grpo"}, {"name": "B", "recipe": "sage_grpo", "args": ["--x", "1"]}]}
    results = [{**_result("flow_grpo", 0, 4.0, 4.2, 8.0), "variant": "A"}, {**_result("flow_grpo", 1, 4.0, 4.4, 9.0), "variant": "A"}]
    md = learning_runs.claim_table("c", claim, results)
    row_a = next(line for line in md.splitlines() if line.startswith("| A |"))
    cells = [c.strip() for c in row_a.split("|")[1:-1]]
    assert cells[1] == "2" and cells[2] == "4.000" and cells[3] == "4.300 ± 0.141" and cells[4] == "+0.3000" and cells[5] == "8.0 / 9.0"
    assert "| B | – | not run |" in md


def test_claims_file_names_existing_recipes():
    claims = learning_runs.load_claims()
    assert {"sage_vs_baselines", "kl_modes", "extensions_vs_grpo"} <= set(claims)
    with pytest.raises(KeyError, match="unknown claim"):
        learning_runs.claims_report(["no_such_claim"], "/nonexistent", "/nonexistent", run=False)


def test_parallel_runs_are_the_unfinished_ones_each_once(tmp_path, monkeypatch):
    """``--jobs``: the runs a claim still needs are collected (a finished recipe run is not), a run folder shared by a
    recipe and a claim variant trains once, each with its share of the cores."""
    claim = {"title": "T", "seeds": [0], "variants": [{"name": "A", "recipe": "flow_grpo"},
                                                      {"name": "B b", "recipe": "sage_grpo", "args": ["--x", "1"]}]}
    out = tmp_path / "out"
    (out / "flow_grpo" / "seed0").mkdir(parents=True)
    (out / "flow_grpo" / "seed0" / "result.json").write_text("{}")
    tasks = [("sage_grpo", 0, [], str(out / "sage_grpo" / "seed0"))]
    assert learning_runs.run_claim("c", claim, str(out), str(tmp_path / "report"), collect=tasks) == []
    b_dir = str(out / "claims" / "c" / "b_b" / "seed0")
    assert tasks[1:] == [("sage_grpo", 0, ["--x", "1"], b_dir)]
    calls = []
    monkeypatch.setattr(learning_runs, "run_one", lambda recipe, seed, out, extra, run_dir, threads: calls.append((run_dir, extra, threads)))
    learning_runs.run_parallel(tasks + [("sage_grpo", 0, ["--x", "1"], b_dir)], jobs=2)
    threads = max(1, (os.cpu_count() or 1) // 2)
    assert sorted(calls) == sorted([(str(out / "sage_grpo" / "seed0"), [], threads), (b_dir, ["--x", "1"], threads)])


def test_kept_result_survives_a_comment_only_edit_of_its_recipe(tmp_path, monkeypatch):
    """A result recorded under an earlier committed version of the recipe file is kept when that version's YAML loads
    equal to the current file's (the header prose edited), left out once a setting changed."""
    import subprocess

    recipes = tmp_path / "configs" / "recipes"
    recipes.mkdir(parents=True)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    monkeypatch.setattr(learning_runs, "ROOT", str(tmp_path))
    shas = []
    for text in ("# header\nmodel:\n  lr: 0.001\n", "# header, reworded\nmodel:\n  lr: 0.001  # same\n", "# header\nmodel:\n  lr: 0.002\n"):
        (recipes / "r.yaml").write_text(text)
        subprocess.run(["git", "add", "."], cwd=tmp_path, check=True)
        subprocess.run([*git, "commit", "-qm", "v"], cwd=tmp_path, check=True)
        shas.append(learning_runs.recipe_sha("r"))
        learning_runs._same_settings_shas.cache_clear()
        if len(shas) == 2:  # the comment-only edit: the first version's results stay
            assert learning_runs.recipe_same_settings("r", shas[0]) and learning_runs.recipe_same_settings("r", shas[1])
    assert learning_runs.recipe_same_settings("r", shas[2])
    assert not learning_runs.recipe_same_settings("r", shas[0]) and not learning_runs.recipe_same_settings("r", shas[1])
    assert not learning_runs.recipe_same_settings("r", None)


def test_differences_from_kept_to_the_last_digit_and_the_compare_command(tmp_path, capsys):
    """A rerun equal to the kept result is identical; a last-bit change of one held-out value is named; a series the
    kept result lacks (added to the runner since) and the run's own record (commit, minutes) are not compared."""
    kept = {"recipe": "flow_grpo", "seed": 0, "commit": "aaa", "minutes": 2.6, "reward_final": 4.415414810180664,
            "curve": [[0, 4.368930339813232], [20, 4.415414810180664]], "kl_last5_mean": float("nan"),
            "curves": {"heldout/reward": [[0, 4.368930339813232], [19, 4.415414810180664]]}}
    same = {**kept, "commit": "bbb", "minutes": 1.9, "curves": {**kept["curves"], "heldout/denoising_loss": [[0, 0.3]]}}
    assert learning_runs.differences_from_kept(same, kept) == []
    off = {**same, "curves": {"heldout/reward": [[0, 4.368930339813232], [19, 4.415415287017822]]}}
    assert learning_runs.differences_from_kept(off, kept) == ["curves/heldout/reward"]
    assert learning_runs.differences_from_kept({**same, "reward_final": 4.415415287017822}, kept) == ["reward_final"]
    os.makedirs(tmp_path / "report" / "results")
    json.dump(kept, open(tmp_path / "report" / "results" / "flow_grpo_seed0.json", "w"))
    run = tmp_path / "out" / "flow_grpo" / "seed0"
    os.makedirs(run)
    json.dump(same, open(run / "result.json", "w"))
    assert learning_runs.main(["--compare-kept", "--out", str(tmp_path / "out"), "--report", str(tmp_path / "report")]) == 0
    assert "flow_grpo seed 0: identical to the kept result (run at aaa)" in capsys.readouterr().out
    json.dump(off, open(run / "result.json", "w"))
    assert learning_runs.main(["--compare-kept", "--out", str(tmp_path / "out"), "--report", str(tmp_path / "report")]) == 1
    assert "DIFFERS in ['curves/heldout/reward']" in capsys.readouterr().out


def test_a_variants_final_evaluation_after_a_stop_keeps_its_arguments(tmp_path, monkeypatch):
    """A run stopped during its last held-out evaluation is evaluated again from its last checkpoint by ``vidalign
    validate``: with the variant's own arguments (its reward fragment). Without them a compressibility variant's final
    "reward" was the recipe's luminance (issue 34, seen)."""
    calls = []
    monkeypatch.setattr(learning_runs.subprocess, "call", lambda cmd, **kw: calls.append(cmd) or 0)
    monkeypatch.setattr(learning_runs, "configured_max_steps", lambda run_dir: 20)
    monkeypatch.setattr(learning_runs, "read_scalars", lambda run_dir: {"heldout/batches_seen": [(15, 15.0)]})
    monkeypatch.setattr(learning_runs, "summarize", lambda run_dir, minutes, criterion: {"improvement": 0.0})
    extra = ["--config", "configs/experiments/compressibility_reward_callbacks.yaml", "--trainer.max_steps", "100"]
    learning_runs.run_one("flow_grpo", 0, str(tmp_path), extra, run_dir=str(tmp_path / "run"))
    fit, validate = calls
    assert fit[1] == "fit" and validate[1] == "validate"
    assert validate[2:4] == ["--config", os.path.join(ROOT, "configs", "recipes", "flow_grpo.yaml")] and validate[4:4 + len(extra)] == extra
    assert validate[-2:] == ["--ckpt_path", "last"]


def test_claims_md_covers_every_claim_when_some_are_run(tmp_path, monkeypatch):
    """``--claims a`` trains claim a and still writes every claim's table (the others from finished and kept runs): a
    run of one claim had left docs/claims.md with that claim alone (issue 34, seen)."""
    claims = {n: {"title": f"claim {n}", "seeds": [0], "variants": [{"name": "v", "recipe": "flow_grpo", "args": ["--trainer.max_steps", "1"]}]}
              for n in ("a", "b")}
    monkeypatch.setattr(learning_runs, "load_claims", lambda: claims)
    trained = []
    monkeypatch.setattr(learning_runs, "run_claim", lambda name, claim, out, report, run=True, collect=None: trained.append((name, run)) or [])
    learning_runs.claims_report(["a"], str(tmp_path / "out"), str(tmp_path), run=True)
    text = (tmp_path / "claims.md").read_text()
    assert "**claim a**" in text and "**claim b**" in text and trained == [("a", True), ("b", False)]
