#!/usr/bin/env python
"""Run the learning recipes (``configs/recipes/*.yaml``) over seeds, resumably, and write the results
table (markdown) and the learning-curve figures (PNG).

    .venv/bin/python scripts/learning_runs.py                       # every recipe, its seeds
    .venv/bin/python scripts/learning_runs.py --recipes flow_grpo   # a subset
    .venv/bin/python scripts/learning_runs.py --report-only         # table and figures from what ran
    .venv/bin/python scripts/learning_runs.py --figures-only --claims shift_table1   # figures alone, no markdown

Each run is ``vidalign fit --config configs/recipes/<recipe>.yaml --seed_everything N
--model.init_args.seed N --trainer.default_root_dir <out>/<recipe>/seed<N>``; a run folder with a
``result.json`` is done and skipped, one with ``checkpoints/last.ckpt`` is resumed from it
(``--ckpt_path last``: the same result as an uninterrupted run), so the script can be stopped and
started again at any point. ``--jobs N`` trains N runs at once (each with ``OMP_NUM_THREADS = cores // N``; on the
2-core development machine ``--jobs 2`` runs two at 1 thread each). On a machine shared with other heavy jobs,
``LEARNING_RUNS_LOCK=/tmp/heavy.lock`` runs each training under ``flock`` of that file. A recipe's seeds come from
its header line ``# seeds: 0 1 2`` (default ``0``), or ``--seeds``.

The table (``<report>/learning.md``, which the documentation site's Results page, ``docs/results.md``, includes as
it is, with ``<report>/claims.md``) gives per run: held-out reward at step 0 and at the
end (mean ± standard error over held-out conditions; a recipe's ``# criterion:`` header line names another held-out
series, SFT's denoising loss, whose improvement is its decrease), the paired improvement and its ``z`` (mean/SE;
the recipe criterion is ``z >= 3``), the drift from the base model, the held-out Fréchet distance, the
last logged KL and the minutes. Figures (``<report>/figures/<recipe>.png``, held-out reward vs
step, one line per seed) need matplotlib (``pip install -c constraints.txt -e ".[plots]"``).

Each finished run's result (with the recipe file's SHA-256 and the git commit it ran at) is also kept in
``<report>/results/<recipe>_seed<N>.json`` (committed with the table), so the report covers every run made for
the current recipe files, across sessions and run folders; a kept result whose recipe settings have changed since is
left out of the report (and named), so the table never mixes settings (an edit of the file's comments alone, its
header prose, keeps the results: the file's committed versions tell).
"""
from __future__ import annotations

import argparse
import functools
import glob
import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CRITERION_Z = 3.0


def recipe_seeds(path: str) -> list[int]:
    """Seeds named in the recipe's header (``# seeds: 0 1 2``), default ``[0]``."""
    for line in open(path):
        m = re.match(r"#\s*seeds:\s*([\d\s]+)$", line.strip())
        if m:
            return [int(s) for s in m.group(1).split()]
    return [0]


def read_scalars(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """All scalars of a run's TensorBoard logs (every ``tb/version_*``: a resumed run writes a new
    version), ``{tag: [(step, value), ...]}`` sorted by step, the latest write winning per step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, dict[int, tuple[float, float]]] = {}
    for f in sorted(glob.glob(os.path.join(run_dir, "tb", "version_*", "events.*"))):
        acc = EventAccumulator(f, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for e in acc.Scalars(tag):
                old = series.setdefault(tag, {}).get(e.step)
                if old is None or e.wall_time >= old[0]:
                    series[tag][e.step] = (e.wall_time, e.value)
    return {tag: sorted((s, v) for s, (_, v) in d.items()) for tag, d in series.items()}


def configured_max_steps(run_dir: str) -> int | None:
    """``trainer.max_steps`` of the run (from the ``config.yaml`` LightningCLI saved in the run folder)."""
    import yaml

    for path in [os.path.join(run_dir, "config.yaml"), *sorted(glob.glob(os.path.join(run_dir, "tb", "version_*", "config.yaml")))]:
        if os.path.exists(path):
            return (yaml.safe_load(open(path)) or {}).get("trainer", {}).get("max_steps")
    return None


def curve(sc: dict, tag: str) -> list[tuple[int, float]]:
    """``[(training batches done, value), ...]`` of a held-out series (x from ``heldout/batches_seen``)."""
    x = dict(sc.get("heldout/batches_seen", []))
    return [(int(x.get(step, step)), v) for step, v in sc.get(tag, [])]


# held-out keys of a criterion: (value, value SE, paired improvement, its SE, its z, step-0 value); the improvement is
# positive when the run got better (a loss: step 0 minus now)
CRITERIA = {
    "heldout/reward": ("heldout/reward", "heldout/reward_se", "heldout/improvement", "heldout/improvement_se",
                       "heldout/improvement_z", "heldout/reward_step0"),
    "heldout/denoising_loss": ("heldout/denoising_loss", "heldout/denoising_loss_se", "heldout/denoising_loss_decrease",
                               "heldout/denoising_loss_decrease_se", "heldout/denoising_loss_decrease_z",
                               "heldout/denoising_loss_step0"),
}


def recipe_criterion(recipe: str) -> str:
    """The held-out series a recipe is judged on: its header line ``# criterion: heldout/<key>`` (default
    ``heldout/reward``; ``heldout/denoising_loss`` for SFT, which optimizes no reward)."""
    for line in open(os.path.join(ROOT, "configs", "recipes", f"{recipe}.yaml")):
        m = re.match(r"#\s*criterion:\s*(\S+)$", line.strip())
        if m:
            if m.group(1) not in CRITERIA:
                raise ValueError(f"configs/recipes/{recipe}.yaml: criterion {m.group(1)!r} is not one of {sorted(CRITERIA)}")
            return m.group(1)
    return "heldout/reward"


def summarize(run_dir: str, minutes: float, criterion: str = "heldout/reward") -> dict:
    """The result of one finished run from its logs, judged on ``criterion`` (a key of :data:`CRITERIA`; its fields
    keep the names ``reward_*`` / ``improvement*``). Raises KeyError naming a missing held-out key."""
    sc = read_scalars(run_dir)
    value, value_se, gain, gain_se, gain_z, step0 = CRITERIA[criterion]
    if value not in sc:
        raise KeyError(f"{run_dir}: no {value} logged (set model.init_args.heldout_conditions in the recipe)")

    def last(tag: str, default=float("nan")) -> float:
        return sc[tag][-1][1] if tag in sc and sc[tag] else default

    kl_tags = [t for t in sc if t.startswith("kl/") and t != "kl/coef"]
    kl_tag = "kl/total" if "kl/total" in sc else (kl_tags[0] if kl_tags else None)
    kl_tail = [v for _, v in sc[kl_tag][-5:]] if kl_tag else []
    z = last(gain_z)
    rewards = curve(sc, value)
    has_step0 = rewards[0][0] == 0  # (a run resumed from a checkpoint without a step-0 baseline starts later)
    return {
        "criterion": criterion,
        "reward_step0": rewards[0][1] if has_step0 else last(step0),
        "reward_step0_se": sc[value_se][0][1] if has_step0 else float("nan"),
        "reward_final": last(value),
        "reward_final_se": last(value_se),
        "improvement": last(gain),
        "improvement_se": last(gain_se),
        "improvement_z": z,
        "learned": bool(z >= CRITERION_Z),
        "drift_from_base": last("heldout/drift_from_base"),
        "frechet_step0": sc.get("heldout/frechet_transnetv2", [(0, float("nan"))])[0][1],
        "frechet_final": last("heldout/frechet_transnetv2"),
        "kl_tag": kl_tag,
        "kl_last5_mean": sum(kl_tail) / len(kl_tail) if kl_tail else float("nan"),
        "steps": int(last("heldout/batches_seen", 0)),
        "minutes": minutes,
        "curve": rewards,
        "curve_motion": curve(sc, "heldout/motion_score"),
        "curve_kl": sc[kl_tag] if kl_tag else [],
        # every held-out series (reward components, metrics) as a curve, for the claims' comparisons
        "curves": {tag: curve(sc, tag) for tag in sc if tag.startswith("heldout/") and tag != "heldout/batches_seen"},
        # GRPO's ratio_stats: each step's off-policy log-ratio statistics, averaged over the run's rounds
        "ratio_steps": {tag: sum(v for _, v in sc[tag]) / len(sc[tag]) for tag in sc if tag.startswith("ratio/step") and sc[tag]},
    }


def recipe_sha(recipe: str) -> str:
    """SHA-256 (first 16 hex digits) of the recipe file's bytes."""
    return hashlib.sha256(open(os.path.join(ROOT, "configs", "recipes", f"{recipe}.yaml"), "rb").read()).hexdigest()[:16]


def recipe_same_settings(recipe: str, sha: str | None) -> bool:
    """Whether a result recorded with recipe file SHA ``sha`` ran the current settings of ``recipe``: ``sha`` is the
    current file's, or that of a committed version of it whose YAML (comments aside: the header's prose) loads equal
    to the current file's."""
    return sha is not None and (sha == recipe_sha(recipe) or sha in _same_settings_shas(ROOT, recipe))


@functools.lru_cache(maxsize=None)
def _same_settings_shas(root: str, recipe: str) -> frozenset[str]:
    import yaml

    rel = f"configs/recipes/{recipe}.yaml"
    settings = yaml.safe_load(open(os.path.join(root, rel), "rb").read())
    try:
        commits = subprocess.check_output(["git", "log", "--format=%H", "--", rel], cwd=root, text=True,
                                          stderr=subprocess.DEVNULL).split()
    except (OSError, subprocess.CalledProcessError):
        return frozenset()
    shas = set()
    for c in commits:
        try:
            old = subprocess.check_output(["git", "show", f"{c}:{rel}"], cwd=root, stderr=subprocess.DEVNULL)
        except subprocess.CalledProcessError:  # (the commit removed the file)
            continue
        if yaml.safe_load(old) == settings:
            shas.add(hashlib.sha256(old).hexdigest()[:16])
    return frozenset(shas)


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def kept_results(report: str) -> list[dict]:
    """Results kept in ``<report>/results/`` whose recipe settings are unchanged (:func:`recipe_same_settings`; stale
    ones are named and left out)."""
    kept = []
    for path in sorted(glob.glob(os.path.join(report, "results", "*.json"))):
        r = json.load(open(path))
        if not os.path.exists(os.path.join(ROOT, "configs", "recipes", f"{r['recipe']}.yaml")):
            continue
        if not recipe_same_settings(r["recipe"], r.get("recipe_sha")):
            print(f"[learning_runs] {path}: the recipe changed since this run (left out of the report; run it again)", flush=True)
            continue
        kept.append(r)
    return kept


#: what a result records about the run rather than the training (left out of :func:`differences_from_kept`)
RUN_RECORD_KEYS = ("commit", "minutes", "recipe_sha", "extra_args")


def compared_values(kept: dict) -> list[str]:
    """The keys of a kept result that a rerun must reproduce: all but :data:`RUN_RECORD_KEYS` and the series (``curves``)."""
    return [k for k in kept if k not in RUN_RECORD_KEYS + ("curves",)]


def differences_from_kept(result: dict, kept: dict) -> list[str]:
    """Where a run's result differs from the kept one of the same recipe and seed, ``[]`` when it reproduces it to the
    last digit: every kept key (but :data:`RUN_RECORD_KEYS`) and every kept held-out series, compared as written (JSON,
    so NaN equals NaN); series the run records and the kept result lacks (added to the runner since) are not compared.
    Used by ``--compare-kept``: a refactor that must change no number reruns the recipes and compares (issue 33)."""
    out = [k for k in compared_values(kept) if json.dumps(kept[k]) != json.dumps(result.get(k))]
    series = result.get("curves", {})
    return out + [f"curves/{k}" for k, v in kept.get("curves", {}).items() if json.dumps(v) != json.dumps(series.get(k))]


def compare_with_kept(out: str, report: str) -> int:
    """``--compare-kept``: each finished run in ``out`` against ``<report>/results/<recipe>_seed<N>.json``; prints one line
    per run and returns 1 when any differs (or none could be compared), else 0."""
    lines, failed = [], False
    for path in sorted(glob.glob(os.path.join(out, "*", "seed*", "result.json"))):
        r = json.load(open(path))
        kept_path = os.path.join(report, "results", f"{r['recipe']}_seed{r['seed']}.json")
        if not os.path.exists(kept_path):
            lines.append(f"{r['recipe']} seed {r['seed']}: no kept result ({kept_path})")
            continue
        kept = json.load(open(kept_path))
        diff = differences_from_kept(r, kept)
        failed |= bool(diff)
        lines.append(f"{r['recipe']} seed {r['seed']}: " + (f"DIFFERS in {diff}" if diff else
                     f"identical to the kept result (run at {kept.get('commit')}): {len(compared_values(kept))} values, "
                     f"{len(kept.get('curves', {}))} held-out series x {len(kept.get('curve', []))} evaluations"))
    print("\n".join(lines) if lines else f"[learning_runs] no finished run in {out}", flush=True)
    return 1 if failed or not lines else 0


def run_one(recipe: str, seed: int, out: str, extra: list[str], run_dir: str | None = None, threads: int | None = None) -> dict:
    """Train (or resume, or skip when finished) one run of ``recipe`` with ``seed``; ``extra``: CLI arguments
    after the recipe's (a claim's variant); ``run_dir`` default ``<out>/<recipe>/seed<N>``; ``threads``: the run's
    ``OMP_NUM_THREADS`` (None: inherited)."""
    run_dir = run_dir or os.path.join(out, recipe, f"seed{seed}")
    result_path = os.path.join(run_dir, "result.json")
    if os.path.exists(result_path):
        print(f"[learning_runs] {recipe} seed {seed}: finished earlier, skipped ({result_path})", flush=True)
        return json.load(open(result_path))
    os.makedirs(run_dir, exist_ok=True)
    vidalign = os.path.join(os.path.dirname(sys.executable), "vidalign")
    cmd = [vidalign, "fit", "--config", os.path.join(ROOT, "configs", "recipes", f"{recipe}.yaml"),
           "--seed_everything", str(seed), "--model.init_args.seed", str(seed),
           "--trainer.default_root_dir", run_dir, "--trainer.enable_progress_bar", "false", *extra]
    spent_path = os.path.join(run_dir, "minutes_spent")
    spent = float(open(spent_path).read()) if os.path.exists(spent_path) else 0.0
    if os.path.exists(os.path.join(run_dir, "checkpoints", "last.ckpt")):
        cmd += ["--ckpt_path", "last"]
    if os.environ.get("LEARNING_RUNS_LOCK"):  # a machine shared with other heavy jobs: one at a time (flock(1))
        cmd = ["flock", os.environ["LEARNING_RUNS_LOCK"], *cmd]
    print(f"[learning_runs] {recipe} seed {seed}: {' '.join(cmd)}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    t0 = time.time()
    with open(os.path.join(run_dir, "console.log"), "a") as log:
        code = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    spent += (time.time() - t0) / 60
    open(spent_path, "w").write(f"{spent:.3f}")
    if code != 0:
        raise RuntimeError(f"{recipe} seed {seed} failed (exit {code}); see {os.path.join(run_dir, 'console.log')}")
    # a run stopped during its last validation and resumed ends without it (Lightning does not repeat the
    # validation of a checkpointed batch): evaluate the last checkpoint instead
    max_steps = configured_max_steps(run_dir)
    done = read_scalars(run_dir).get("heldout/batches_seen", [])
    if max_steps and (not done or done[-1][1] < max_steps):
        # with the variant's own arguments (its reward fragment): without them a claim variant's last evaluation scored
        # the recipe's reward (seen: a compressibility run's final held-out "reward" was its luminance)
        val = [vidalign, "validate", "--config", os.path.join(ROOT, "configs", "recipes", f"{recipe}.yaml"), *extra,
               "--trainer.default_root_dir", run_dir, "--ckpt_path", "last"]
        with open(os.path.join(run_dir, "console.log"), "a") as log:
            if subprocess.call(val, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env) != 0:
                raise RuntimeError(f"{recipe} seed {seed}: the final held-out evaluation failed; see {os.path.join(run_dir, 'console.log')}")
    result = {"recipe": recipe, "seed": seed, "recipe_sha": recipe_sha(recipe), "commit": git_commit(),
              "extra_args": extra, **summarize(run_dir, spent, recipe_criterion(recipe))}
    json.dump(result, open(result_path, "w"), indent=1)
    return result


def recipe_reward(recipe: str) -> str:
    """The reward line of a recipe's header (``# reward: ...``), for the table."""
    for line in open(os.path.join(ROOT, "configs", "recipes", f"{recipe}.yaml")):
        m = re.match(r"#\s*reward:\s*(.+)$", line.strip())
        if m:
            return m.group(1)
    return ""


def fmt(x: float, nd: int = 3) -> str:
    return "–" if x != x else f"{x:.{nd}f}"


def table(results: list[dict]) -> str:
    rows = ["| recipe | reward | seed | held-out reward (SFT: loss) step 0 | final | improvement (SE) | z | learned (z ≥ 3) | drift from base | Fréchet step 0 → final | KL (last 5) | min |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(results, key=lambda r: (r["recipe"], r["seed"])):
        rows.append(
            f"| {r['recipe']} | {recipe_reward(r['recipe'])} | {r['seed']} | {fmt(r['reward_step0'])} ± {fmt(r['reward_step0_se'])} "
            f"| {fmt(r['reward_final'])} ± {fmt(r['reward_final_se'])} | {fmt(r['improvement'], 4)} ({fmt(r['improvement_se'], 4)}) "
            f"| {fmt(r['improvement_z'], 1)} | {'yes' if r['learned'] else '**no**'} | {fmt(r['drift_from_base'], 4)} "
            f"| {fmt(r['frechet_step0'])} → {fmt(r['frechet_final'])} | {fmt(r['kl_last5_mean'], 4)} ({r['kl_tag'] or '–'}) | {fmt(r['minutes'], 1)} |"
        )
    return "\n".join(rows)


def _pyplot():
    """``matplotlib.pyplot`` on the Agg backend, or None (matplotlib not installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig, path: str) -> str:
    """Write ``fig`` to ``path`` (PNG) at its own size and dpi, and close it. The saved canvas is the figure's
    (no ``bbox_inches="tight"``): the drawing functions lay out title and legend inside it, which the tests check."""
    plt = _pyplot()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def draw_recipe_figure(runs: list[dict], title: str, ylabel: str):
    """The learning curve of one recipe: its held-out series vs training step, one line per seed (``runs``: results
    with ``seed`` and ``curve`` ``[(step, value), ...]``). Returns the matplotlib Figure."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=110)
    for r in sorted(runs, key=lambda r: r["seed"]):
        steps, values = zip(*r["curve"])
        ax.plot(steps, values, marker="o", label=f"seed {r['seed']}")
    ax.set_xlabel("training step (round / batch)")
    ax.set_ylabel(ylabel)
    ax.set_title(textwrap.fill(title, 60), fontsize=9)  # long reward names wrap
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def figures(results: list[dict], folder: str) -> list[str]:
    """``<folder>/<recipe>.png`` for each recipe of ``results`` (:func:`draw_recipe_figure`)."""
    if _pyplot() is None:
        print("[learning_runs] matplotlib not installed: no figures (pip install -c constraints.txt -e '.[plots]')")
        return []
    written = []
    for recipe in sorted({r["recipe"] for r in results}):
        fig = draw_recipe_figure([r for r in results if r["recipe"] == recipe], f"{recipe}: {recipe_reward(recipe)}",
                                 "held-out " + recipe_criterion(recipe).split("/", 1)[1].replace("_", " "))
        written.append(save_figure(fig, os.path.join(folder, f"{recipe}.png")))
    return written


def upload_report(tracker: str, figure_paths: list[str], markdown_path: str, wandb_dir: str | None = None) -> str:
    """Send the report's figures (images) and its table (``learning.md``) to one run of an experiment tracker, named
    ``learning-report``; returns where it went. (The learning runs themselves keep TensorBoard: their held-out series
    are read from its event files.)

    ``wandb``: a W&B run in project ``$WANDB_PROJECT`` (default ``vidalign``), the figures logged as ``wandb.Image`` under
    ``figures/<name>``, the table saved with the run; ``WANDB_MODE=offline`` works without an account (the run folder
    under ``$WANDB_DIR``, else ``wandb_dir``, else the current folder). ``mlflow``: an MLflow run in experiment ``$MLFLOW_EXPERIMENT_NAME`` (default ``vidalign``) at
    ``$MLFLOW_TRACKING_URI`` (a server or ``sqlite:///...``; required, as for the logger), the figures as artifacts
    under ``figures/``, the table as ``learning.md`` (with a database and no server, MLflow keeps artifacts in
    ``./mlruns`` of the current folder). Our choice.

    Raises:
        ValueError: an unknown tracker, or ``mlflow`` without ``MLFLOW_TRACKING_URI``.
    """
    if tracker == "wandb":
        import shutil

        import wandb

        if wandb_dir:
            os.makedirs(wandb_dir, exist_ok=True)
        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "vidalign"), name="learning-report", job_type="learning-report", dir=wandb_dir)
        run.log({f"figures/{os.path.splitext(os.path.basename(f))[0]}": wandb.Image(f) for f in figure_paths})
        shutil.copy(markdown_path, os.path.join(run.dir, "learning.md"))  # (a copy: run.save of an outside file leaves a symlink)
        run.save(os.path.join(run.dir, "learning.md"), base_path=run.dir, policy="now")
        where = f"W&B run {run.id} ({run.dir})"
        run.finish()
        return where
    if tracker == "mlflow":
        import mlflow

        if not os.environ.get("MLFLOW_TRACKING_URI"):
            raise ValueError("--tracker mlflow: set MLFLOW_TRACKING_URI (a server, e.g. http://127.0.0.1:5000, or sqlite:///runs/mlflow.db)")
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "vidalign"))
        with mlflow.start_run(run_name="learning-report") as run:
            for f in figure_paths:
                mlflow.log_artifact(f, artifact_path="figures")
            mlflow.log_artifact(markdown_path)
        return f"MLflow run {run.info.run_id} at {os.environ['MLFLOW_TRACKING_URI']}"
    raise ValueError(f"--tracker must be wandb or mlflow, got {tracker!r}")


# ------------------------------------------------------------------ claims (configs/claims.yaml)
def load_claims() -> dict:
    import yaml

    path = os.path.join(ROOT, "configs", "claims.yaml")
    claims = yaml.safe_load(open(path)) or {}
    for name, claim in claims.items():
        for key in ("title", "seeds", "variants"):
            if key not in claim:
                raise KeyError(f"{path}: claim {name!r} lacks {key!r}")
        for v in claim["variants"]:
            if not os.path.exists(os.path.join(ROOT, "configs", "recipes", f"{v['recipe']}.yaml")):
                raise FileNotFoundError(f"{path}: claim {name!r}, variant {v.get('name')!r}: no recipe configs/recipes/{v['recipe']}.yaml")
    return claims


def variant_dir(out: str, claim: str, variant: dict, seed: int) -> str | None:
    """Run folder of a claim's variant; None for a variant without arguments (the recipe's own run)."""
    if not variant.get("args"):
        return None
    slug = re.sub(r"[^A-Za-z0-9]+", "_", variant["name"]).strip("_").lower()
    return os.path.join(out, "claims", claim, slug, f"seed{seed}")


def run_claim(name: str, claim: dict, out: str, report: str, run: bool = True, collect: list | None = None) -> list[dict]:
    """Every variant × seed of a claim (trained unless finished here or kept in ``<report>/results``;
    ``run=False``: finished ones only; ``collect``: a list that gets the ``(recipe, seed, args, run_dir)`` of each run
    still to train, none trained)."""
    results = []
    for v in claim["variants"]:
        for seed in claim["seeds"]:
            run_dir = variant_dir(out, name, v, seed) or os.path.join(out, v["recipe"], f"seed{seed}")
            done = os.path.join(run_dir, "result.json")
            args = list(map(str, v.get("args", [])))
            if args:  # a variant's result is kept as <report>/results/claims/<claim>/<variant>_seed<N>.json
                keep = os.path.join(report, "results", "claims", name, f"{os.path.basename(os.path.dirname(run_dir))}_seed{seed}.json")
                kept = [json.load(open(keep))] if os.path.exists(keep) else []
                kept = [k for k in kept if recipe_same_settings(v["recipe"], k.get("recipe_sha")) and k.get("extra_args") == args]
            else:  # the recipe's own run (kept by the recipe table)
                keep = None
                kept = [k for k in kept_results(report) if k["recipe"] == v["recipe"] and k["seed"] == seed]
            if kept and not os.path.exists(done):  # finished in an earlier session
                results.append({**kept[0], "variant": v["name"]})
                continue
            if not run and not os.path.exists(done):
                continue
            if collect is not None:
                if not os.path.exists(done):
                    collect.append((v["recipe"], seed, args, run_dir))
                continue
            r = run_one(v["recipe"], seed, out, args, run_dir=run_dir)
            if keep:
                os.makedirs(os.path.dirname(keep), exist_ok=True)
                json.dump(r, open(keep, "w"), indent=1)
            results.append({**r, "variant": v["name"]})
    return results


def _series_ends(r: dict, metric: str) -> tuple[float, float]:
    c = r.get("curves", {}).get(metric) or (r["curve"] if metric == "heldout/reward" else [])
    return (c[0][1], c[-1][1]) if c else (float("nan"), float("nan"))


def claim_table(name: str, claim: dict, results: list[dict]) -> str:
    """Markdown: one row per variant (mean and spread over seeds)."""
    import statistics

    metric = claim.get("metric", "heldout/reward")
    also = claim.get("also", [])  # more held-out series: "step 0 → final" (means over seeds)
    rollouts = claim.get("rollouts")  # the variants' common rollout budget: adds the change per 1,000 rollouts
    per_k = " change per 1,000 rollouts |" if rollouts else ""
    lines = [f"**{claim['title']}** ({claim.get('source', '')}; compared: `{metric}`; seeds {', '.join(map(str, claim['seeds']))})", "",
             f"| variant | seeds | step 0 | final (mean ± sd over seeds) | change |{per_k} z per seed (total reward) | drift from base | KL (last 5) | min/run |"
             + "".join(f" `{m}` step 0 → final |" for m in also),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |" + " --- |" * (len(also) + bool(rollouts))]
    for v in claim["variants"]:
        rs = sorted((r for r in results if r["variant"] == v["name"]), key=lambda r: r["seed"])
        if not rs:
            lines.append(f"| {v['name']} | – | not run | | | | | | |" + " |" * (len(also) + bool(rollouts)))
            continue
        extra = ""
        for m in also:
            e = [_series_ends(r, m) for r in rs]
            extra += f" {fmt(statistics.mean(x[0] for x in e), 4)} → {fmt(statistics.mean(x[1] for x in e), 4)} |"
        ends = [_series_ends(r, metric) for r in rs]
        finals = [e[1] for e in ends]
        sd = statistics.stdev(finals) if len(finals) > 1 else float("nan")
        change = statistics.mean(e[1] - e[0] for e in ends)
        lines.append(
            f"| {v['name']} | {len(rs)} | {fmt(statistics.mean(e[0] for e in ends))} | {fmt(statistics.mean(finals))} ± {fmt(sd)} "
            f"| {change:+.4f} |{f' {change * 1000 / rollouts:+.4f} |' if rollouts else ''} {' / '.join(fmt(r['improvement_z'], 1) for r in rs)} | {fmt(statistics.mean(r['drift_from_base'] for r in rs), 4)} "
            f"| {fmt(statistics.mean(r['kl_last5_mean'] for r in rs), 5) if rs[0]['kl_tag'] else '–'} | {fmt(statistics.mean(r['minutes'] for r in rs), 1)} |" + extra)
    if claim.get("ratio_steps"):
        lines += ["", ratio_steps_table(claim, results)]
    return "\n".join(lines)


def ratio_steps_table(claim: dict, results: list[dict]) -> str:
    """Markdown: per variant and denoising step, the off-policy ``mean |log ρ|`` and the share of ratios beyond the clip
    range (GRPO's ``ratio_stats``), averaged over rounds and seeds; "–" where a run logged none."""
    import statistics

    steps = sorted({int(k.split("/")[1][4:]) for r in results for k in r.get("ratio_steps", {})})
    head = ["", "*Per denoising step (0 = highest noise): off-policy mean |log ρ| / share with |ρ − 1| > clip range, "
            "averaged over rounds and seeds (the minibatches after the first of each round).*", "",
            "| variant |" + "".join(f" step {t} |" for t in steps), "| --- |" + " --- |" * len(steps)]
    for v in claim["variants"]:
        rs = [r for r in results if r["variant"] == v["name"]]
        cells = []
        for t in steps:
            a = [r["ratio_steps"][f"ratio/step{t}/abs_log"] for r in rs if f"ratio/step{t}/abs_log" in r.get("ratio_steps", {})]
            c = [r["ratio_steps"][f"ratio/step{t}/clip_frac"] for r in rs if f"ratio/step{t}/clip_frac" in r.get("ratio_steps", {})]
            cells.append(f" {statistics.mean(a):.2e} / {statistics.mean(c):.2f} |" if a else " – |")
        head.append(f"| {v['name']} |" + "".join(cells))
    return "\n".join(head[1:])


def _text_width(fig, text: str, fontsize: float) -> float:
    """Width in pixels (at the figure's dpi) of ``text`` drawn at ``fontsize``."""
    t = fig.text(0, 0, text, fontsize=fontsize)
    width = t.get_window_extent(renderer=fig.canvas.get_renderer()).width
    t.remove()
    return width


def _wrap(fig, text: str, fontsize: float, width: float) -> str:
    """``text`` broken at spaces into lines each at most ``width`` pixels wide when drawn at ``fontsize`` (a single
    word wider than that stays whole)."""
    lines: list[str] = []
    for word in text.split():
        if lines and _text_width(fig, f"{lines[-1]} {word}", fontsize) <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return "\n".join(lines)


def draw_claim_figure(claim: dict, results: list[dict]):
    """A claim's comparison: the compared held-out series per variant (mean over seeds) and, where logged, the KL per
    round (``results``: results with ``variant``, ``curve``/``curves`` and ``curve_kl``). Returns the matplotlib Figure.

    Drawn at its final size (constrained layout): the title is wrapped to the figure's width, the legend (one entry per
    variant, shared by both panels) sits below the panels with its names wrapped to fit, and the figure is as tall as
    title and legend need, so every box lies inside the canvas that :func:`save_figure` writes."""
    plt = _pyplot()
    metric = claim.get("metric", "heldout/reward")
    has_kl = any(r.get("curve_kl") for r in results)
    width, panels_height = (9.0 if has_kl else 4.5), 2.9
    fig, axes = plt.subplots(1, 2 if has_kl else 1, figsize=(width, panels_height), dpi=110, squeeze=False, layout="constrained")
    handles = []
    for k, v in enumerate(claim["variants"]):
        color = f"C{k % 10}"  # one colour per variant in both panels (a variant without KL skips the second)
        rs = [r for r in results if r["variant"] == v["name"]]
        if not rs:
            continue
        curves = [r.get("curves", {}).get(metric) or r["curve"] for r in rs]
        n = min(len(c) for c in curves)
        xs = [c[0] for c in curves[0][:n]]
        handles += axes[0][0].plot(xs, [sum(c[i][1] for c in curves) / len(curves) for i in range(n)], marker="o", color=color)
        if has_kl and rs[0].get("curve_kl"):
            kl = rs[0]["curve_kl"]
            axes[0][1].plot([s + 1 for s, _ in kl], [val for _, val in kl], color=color)
        handles[-1].set_label(v["name"])
    axes[0][0].set_xlabel("training step (round / batch)")
    axes[0][0].set_ylabel(f"{metric}\n(mean over seeds)")
    axes[0][0].grid(alpha=0.3)
    if has_kl:
        axes[0][1].set_xlabel("round")
        axes[0][1].set_ylabel("KL (seed 0 / first seed)")
        axes[0][1].set_yscale("symlog", linthresh=1e-6)
        axes[0][1].grid(alpha=0.3)
    inner = fig.bbox.width - 24  # pixels: the canvas less the layout's margins
    title = _wrap(fig, claim["title"], 8, inner)
    fig.suptitle(title, fontsize=8)
    legend_lines = 0
    if handles:
        # columns: as many as fit side by side at the longest name's width (a name wider than one column wraps)
        names = [h.get_label() for h in handles]
        handle_width = 40  # pixels: the line sample and the spacing around it
        ncols = max(1, min(len(names), int(inner // (max(_text_width(fig, n, 7) for n in names) + handle_width))))
        wrapped = [_wrap(fig, n, 7, inner / ncols - handle_width) for n in names]
        for h, n in zip(handles, wrapped):
            h.set_label(n)
        fig.legend(handles=handles, loc="outside lower center", ncols=ncols, fontsize=7)
        rows = [wrapped[i:i + ncols] for i in range(0, len(wrapped), ncols)]
        legend_lines = sum(max(n.count("\n") + 1 for n in row) for row in rows)
    # room for the title and the legend above and below the panels (8 pt and 7 pt lines, with spacing)
    height = panels_height + (title.count("\n") + 1) * 0.16 + legend_lines * 0.15 + (0.15 if handles else 0)
    fig.set_size_inches(width, round(height * fig.dpi) / fig.dpi)  # whole pixels: the PNG is exactly the canvas
    return fig


def claim_figure(name: str, claim: dict, results: list[dict], folder: str) -> str | None:
    """``<folder>/claim_<name>.png`` (:func:`draw_claim_figure`); None without matplotlib."""
    if _pyplot() is None:
        return None
    return save_figure(draw_claim_figure(claim, results), os.path.join(folder, f"claim_{name}.png"))


def claims_report(names: list[str], out: str, report: str, run: bool) -> str:
    claims = load_claims()
    unknown = [n for n in names if n not in claims]
    if unknown:
        raise KeyError(f"unknown claim(s) {unknown}; configs/claims.yaml has {sorted(claims)}")
    parts = []
    for name in claims:  # claims.md covers every claim: the named ones run (with ``run``), the others from finished and kept runs
        results = run_claim(name, claims[name], out, report, run=run and name in names)
        parts.append(claim_table(name, claims[name], results))
        path = claim_figure(name, claims[name], results, os.path.join(report, "figures"))
        if path:
            # relative to claims.md itself, so the link works in <report>/claims.md and where docs/results.md includes it
            parts.append(f"\n![{name}]({os.path.relpath(path, report)})")
    md = "\n\n".join(parts)
    os.makedirs(report, exist_ok=True)
    open(os.path.join(report, "claims.md"), "w").write("# The papers' claims at tiny scale (scripts/learning_runs.py --claims)\n\n" + md + "\n")
    return md


def run_parallel(tasks: list[tuple[str, int, list[str], str]], jobs: int) -> None:
    """Train ``tasks`` (``(recipe, seed, extra args, run_dir)``, the same run folder once) ``jobs`` at a time, each with
    ``OMP_NUM_THREADS = max(1, cores // jobs)``; the first failure is raised once the others have ended. Each run is
    the same command as in a sequential invocation (the figures it gives do not depend on the order; our choice)."""
    from concurrent.futures import ThreadPoolExecutor

    unique, seen = [], set()
    for t in tasks:
        key = os.path.realpath(t[3])
        if key not in seen:
            seen.add(key)
            unique.append(t)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    print(f"[learning_runs] {len(unique)} run(s), {jobs} at a time, {threads} thread(s) each", flush=True)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(run_one, recipe, seed, os.path.dirname(os.path.dirname(run_dir)), list(extra), run_dir, threads)
                   for recipe, seed, extra, run_dir in unique]
        errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        raise errors[0]


def figures_only(recipes: list[str], claim_names: list[str], out: str, report: str) -> int:
    """``--figures-only``: redraw the figures of ``recipes`` and of the claims ``claim_names`` from the finished runs in
    ``out`` and the results kept in ``<report>/results`` (nothing trained, no table written)."""
    results = {}
    for r in kept_results(report):
        results[(r["recipe"], r["seed"])] = r
    for path in sorted(glob.glob(os.path.join(out, "*", "seed*", "result.json"))):  # a run here replaces a kept one
        r = json.load(open(path))
        if r["recipe"] in recipes and recipe_same_settings(r["recipe"], r.get("recipe_sha")) and not r.get("extra_args"):
            results[(r["recipe"], r["seed"])] = r
    paths = figures([r for (recipe, _), r in results.items() if recipe in recipes], os.path.join(report, "figures"))
    claims = load_claims()
    for name in claim_names:
        if name not in claims:
            raise KeyError(f"unknown claim {name!r}; configs/claims.yaml has {sorted(claims)}")
        path = claim_figure(name, claims[name], run_claim(name, claims[name], out, report, run=False), os.path.join(report, "figures"))
        paths += [path] if path else []
    for path in paths:
        print(f"[learning_runs] figure {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", nargs="*", help="recipe names (no names: every configs/recipes/*.yaml)")
    p.add_argument("--seeds", nargs="*", type=int, help="seeds (default: each recipe's '# seeds:' header)")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "learning"), help="run folders")
    p.add_argument("--report", default=os.path.join(ROOT, "docs"), help="where learning.md and figures/ go")
    p.add_argument("--readme", action="store_true", help="no effect (kept so that it is not passed on to vidalign fit): the tables "
                   "live in <report>/learning.md and claims.md, which docs/results.md includes")
    p.add_argument("--report-only", action="store_true", help="no training: table and figures from finished runs")
    p.add_argument("--figures-only", action="store_true", help="no training and no markdown: only the figures of the "
                   "given recipes and claims, from finished runs in --out and the results kept in <report>/results")
    p.add_argument("--claims", nargs="*", help="claims of configs/claims.yaml to run (no names: all). Without --recipes and "
                   "--claims every recipe and every claim runs; with only one of them, only that part")
    p.add_argument("--compare-kept", action="store_true", help="no training: compare each finished run in --out with the result "
                   "kept in <report>/results (every kept value and held-out series, to the last digit); exit 1 if any differs. "
                   "The kept results were trained at 1 thread per run (--jobs 2 on 2 cores): rerun them the same way")
    p.add_argument("--tracker", choices=["wandb", "mlflow"], help="also send the report's figures and table to one run of this "
                   "tracker (upload_report: W&B project $WANDB_PROJECT, MLflow at $MLFLOW_TRACKING_URI)")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once (each with OMP_NUM_THREADS = cores // jobs); "
                   "default 1, one after the other")
    # (the table and figures always cover every finished run in --out, not only this invocation's recipes)
    args, extra = p.parse_known_args(argv)
    if args.jobs < 1:
        raise SystemExit(f"--jobs must be >= 1, got {args.jobs}")
    everything = args.recipes is None and args.claims is None
    all_recipes = sorted(os.path.splitext(os.path.basename(f))[0] for f in glob.glob(os.path.join(ROOT, "configs", "recipes", "*.yaml")))
    if args.recipes is None:  # --claims alone: claims only
        recipes = all_recipes if everything else []
    else:  # --recipes without names: every recipe
        recipes = args.recipes or all_recipes
    for recipe in recipes:
        if not os.path.exists(os.path.join(ROOT, "configs", "recipes", f"{recipe}.yaml")):
            raise FileNotFoundError(f"no recipe {os.path.join(ROOT, 'configs', 'recipes', recipe + '.yaml')}")
    claim_names = (args.claims or list(load_claims())) if (everything or args.claims is not None) else []
    if args.figures_only:
        return figures_only(recipes, claim_names, args.out, args.report)
    if args.compare_kept:
        return compare_with_kept(args.out, args.report)
    if args.jobs > 1 and not args.report_only:  # train everything first, then the sequential pass below only reads
        tasks = [(recipe, seed, list(extra), os.path.join(args.out, recipe, f"seed{seed}")) for recipe in recipes
                 for seed in (args.seeds if args.seeds is not None else recipe_seeds(os.path.join(ROOT, "configs", "recipes", f"{recipe}.yaml")))]
        claims = load_claims()
        for name in claim_names:
            if name not in claims:
                raise KeyError(f"unknown claim {name!r}; configs/claims.yaml has {sorted(claims)}")
            run_claim(name, claims[name], args.out, args.report, collect=tasks)
        run_parallel(tasks, args.jobs)
    results = []
    for recipe in recipes:
        path = os.path.join(ROOT, "configs", "recipes", f"{recipe}.yaml")
        for seed in args.seeds if args.seeds is not None else recipe_seeds(path):
            done = os.path.join(args.out, recipe, f"seed{seed}", "result.json")
            if args.report_only:
                if os.path.exists(done):
                    results.append(json.load(open(done)))
                continue
            results.append(run_one(recipe, seed, args.out, extra))
    # the report covers every finished run in --out (earlier invocations' subsets included), then the results kept
    # in <report>/results/ for unchanged recipes (earlier sessions); a run here replaces a kept one
    done = {(r["recipe"], r["seed"]) for r in results}
    for path in sorted(glob.glob(os.path.join(args.out, "*", "seed*", "result.json"))):
        r = json.load(open(path))
        if (r["recipe"], r["seed"]) not in done and os.path.exists(os.path.join(ROOT, "configs", "recipes", f"{r['recipe']}.yaml")):
            results.append(r)
            done.add((r["recipe"], r["seed"]))
    os.makedirs(os.path.join(args.report, "results"), exist_ok=True)
    for r in results:
        if r.get("recipe_sha") == recipe_sha(r["recipe"]) and not r.get("extra_args"):  # (runs with extra CLI arguments are not the recipe's)
            json.dump(r, open(os.path.join(args.report, "results", f"{r['recipe']}_seed{r['seed']}.json"), "w"), indent=1)
    results += [r for r in kept_results(args.report) if (r["recipe"], r["seed"]) not in done]
    md = table(results)
    os.makedirs(args.report, exist_ok=True)
    open(os.path.join(args.report, "learning.md"), "w").write(
        "# Learning runs (scripts/learning_runs.py)\n\nHeld-out reward: mean ± standard error over held-out conditions; "
        f"improvement: paired difference to step 0 (same conditions, same noise); learned: z ≥ {CRITERION_Z:g}.\n\n" + md + "\n"
    )
    paths = figures(results, os.path.join(args.report, "figures"))
    if args.tracker:
        where = upload_report(args.tracker, paths, os.path.join(args.report, "learning.md"), wandb_dir=os.environ.get("WANDB_DIR") or args.out)
        print(f"[learning_runs] report sent to {where}", flush=True)
    if args.readme:
        print("[learning_runs] --readme: no effect; the documentation site (docs/results.md) includes "
              f"{os.path.join(args.report, 'learning.md')} and claims.md as they are", flush=True)
    print(md)
    if claim_names:
        claims_md = claims_report(claim_names, args.out, args.report, run=not args.report_only)
        print(claims_md)
    for path in paths:
        print(f"[learning_runs] figure {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
