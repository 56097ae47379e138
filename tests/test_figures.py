"""Every kind of figure ``scripts/learning_runs.py`` draws fits its canvas (issue 33, item 5): rendered from small
synthetic results, the saved PNG is the figure's canvas and the title, legend and axis-label boxes (and everything
the layout places) lie inside it. Covers the per-recipe learning curve, the one-panel claim figure (long title, long
variant names, long metric), the two-panel claim figure with the KL panel, and each claim of ``configs/claims.yaml``
and each recipe with its own title and names."""
import os
import sys

import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.image  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import learning_runs  # noqa: E402

TOL = 0.5  # pixels


def _curve(start, slope, steps=(0, 5, 10, 15, 20)):
    return [(s, start + slope * s) for s in steps]


def _kl(n=20, sign=1.0):
    return [(i, sign * 10 ** (-5 + 3 * i / n) * (-1 if i == 9 else 1)) for i in range(n)]  # one negative value (symlog)


def _claim_results(claim, with_kl):
    metric = claim.get("metric", "heldout/reward")
    out = []
    for k, v in enumerate(claim["variants"]):
        for seed in claim["seeds"]:
            c = _curve(4.37, 0.001 * (k + 1) + 0.0001 * seed)
            out.append({"variant": v["name"], "seed": seed, "curve": c, "curves": {metric: c},
                        "curve_kl": _kl() if with_kl else []})
    return out


def _inside(box, canvas):
    return (box.x0 >= canvas.x0 - TOL and box.y0 >= canvas.y0 - TOL
            and box.x1 <= canvas.x1 + TOL and box.y1 <= canvas.y1 + TOL)


def _check_fits(fig, path):
    """Save ``fig`` as the script does, then check the saved canvas holds the title, legend and axis-label boxes."""
    learning_runs.save_figure(fig, str(path))
    height_px, width_px = matplotlib.image.imread(str(path)).shape[:2]
    FigureCanvasAgg(fig).draw()  # (save_figure closed it) drawn again at the figure's dpi, as saved
    renderer = fig.canvas.get_renderer()
    canvas = fig.bbox
    # the saved file is the figure's canvas (no bbox_inches="tight" cropping or growing): the boxes below are in it
    assert abs(width_px - canvas.width) < 1 and abs(height_px - canvas.height) < 1, (width_px, height_px, canvas.bounds)
    boxes = {}
    suptitle = getattr(fig, "_suptitle", None)
    if suptitle is not None and suptitle.get_text():
        boxes["suptitle"] = suptitle
    for i, ax in enumerate(fig.axes):
        for what, artist in (("title", ax.title), ("xlabel", ax.xaxis.label), ("ylabel", ax.yaxis.label)):
            if artist.get_text():
                boxes[f"axes {i} {what}"] = artist
        if ax.get_legend() is not None:
            boxes[f"axes {i} legend"] = ax.get_legend()
    for i, legend in enumerate(fig.legends):
        boxes[f"figure legend {i}"] = legend
    assert any("title" in k for k in boxes), "the figure has no title"
    assert any("legend" in k for k in boxes), "the figure has no legend"
    outside = {k: tuple(round(x) for x in a.get_window_extent(renderer).extents) for k, a in boxes.items()
               if not _inside(a.get_window_extent(renderer), canvas)}
    assert not outside, f"outside the canvas {tuple(round(x) for x in canvas.extents)}: {outside}"
    # and whatever else the layout places (tick labels included)
    tight = fig.get_tightbbox(renderer)  # inches
    assert _inside(tight.transformed(fig.dpi_scale_trans), canvas), (tight.bounds, fig.bbox_inches.bounds)


LONG_TITLE = ("SFT vs SHIFT on motion-poor data (the real clips at 16 fps, half the motion per frame of the base's 8 fps "
              "data), 80 batches, compared on the motion of the held-out samples (21 held-out clips x 2 draws, as the SFT recipe)")


def test_recipe_figure_fits(tmp_path):
    runs = [{"seed": s, "curve": _curve(0.444, -0.0008 - 0.0001 * s, (0, 20, 40))} for s in (0, 1, 2)]
    fig = learning_runs.draw_recipe_figure(runs, "self_paced_grpo: raw flicker, then luminance (x10), self-paced curriculum "
                                           "with a long reward description that wraps over lines", "held-out denoising loss")
    _check_fits(fig, tmp_path / "recipe.png")


def test_one_panel_claim_figure_fits(tmp_path):
    """Long title, long variant names and a long metric name, no KL: the shape of the SHIFT Table-1 and DPO claims."""
    claim = {"title": LONG_TITLE, "seeds": [0, 1, 2], "metric": "heldout/dpo/implicit_acc",
             "variants": [{"name": "SFT on 16 fps clips (the SFT recipe at the SHIFT recipe's lr 1e-3 and 80 batches)"},
                          {"name": "SHIFT on 16 fps clips (motion reward to 8 fps real motion)"},
                          {"name": "SHIFT lam 100 on 16 fps clips (same motion reward; advantage term 10x the recipe's)"}]}
    _check_fits(learning_runs.draw_claim_figure(claim, _claim_results(claim, with_kl=False)), tmp_path / "claim1.png")


def test_two_panel_claim_figure_fits(tmp_path):
    """Six variants with the KL panel (negative KL values on the symlog axis): the shape of the KL-modes claim."""
    claim = {"title": LONG_TITLE, "seeds": [0, 1], "metric": "heldout/reward/luminance",
             "variants": [{"name": f"variant {k}: a descriptive name of the setting it changes"} for k in range(6)]}
    _check_fits(learning_runs.draw_claim_figure(claim, _claim_results(claim, with_kl=True)), tmp_path / "claim2.png")


@pytest.mark.parametrize("name", sorted(learning_runs.load_claims()))
def test_each_claim_figure_fits_with_its_own_names(tmp_path, name):
    claim = learning_runs.load_claims()[name]
    has_kl = name != "dpo_heldout_pairs" and name != "shift_table1"
    _check_fits(learning_runs.draw_claim_figure(claim, _claim_results(claim, with_kl=has_kl)), tmp_path / f"{name}.png")


def test_each_recipe_figure_fits_with_its_own_title(tmp_path):
    recipes = sorted(os.path.splitext(f)[0] for f in os.listdir(os.path.join(ROOT, "configs", "recipes")) if f.endswith(".yaml"))
    for recipe in recipes:
        fig = learning_runs.draw_recipe_figure([{"seed": s, "curve": _curve(4.37, 0.001 * (s + 1))} for s in (0, 1, 2)],
                                               f"{recipe}: {learning_runs.recipe_reward(recipe)}",
                                               "held-out " + learning_runs.recipe_criterion(recipe).split("/", 1)[1].replace("_", " "))
        _check_fits(fig, tmp_path / f"{recipe}.png")


def test_figures_only_redraws_from_kept_results_and_writes_no_markdown(tmp_path):
    """``--figures-only``: the figures of the named recipes and claims from the results kept in ``<report>/results``,
    nothing trained, no table written."""
    import json

    (tmp_path / "results").mkdir()
    for seed in (0, 1):
        json.dump({"recipe": "dpo", "seed": seed, "recipe_sha": learning_runs.recipe_sha("dpo"), "extra_args": [],
                   "curve": _curve(4.37, 0.001), "curves": {"heldout/dpo/implicit_acc": _curve(0.0, 0.05)}, "curve_kl": []},
                  open(tmp_path / "results" / f"dpo_seed{seed}.json", "w"))
    assert learning_runs.main(["--figures-only", "--recipes", "dpo", "--claims", "dpo_heldout_pairs",
                               "--out", str(tmp_path / "runs"), "--report", str(tmp_path)]) == 0
    assert sorted(os.listdir(tmp_path / "figures")) == ["claim_dpo_heldout_pairs.png", "dpo.png"]
    assert sorted(os.listdir(tmp_path)) == ["figures", "results"]
