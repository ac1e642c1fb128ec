"""Text-to-image steering on tiny random diffusers pipelines (a Stable-Diffusion UNet pipeline and a
PixArt DiT pipeline): sites, collection, fit, apply in every mode, per-prompt routing under CFG, bake
and save/reload in stock diffusers, the artifact guard, and the CLI."""

from __future__ import annotations

import warnings

import pytest
import torch

import lineas_fast as lf
from lineas_fast import collect_diffusion
from lineas_fast.diffusion import view_of
from tiny_pipelines import MMDIT, PIPELINES, tiny_pipeline

pytest.importorskip("diffusers")
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")]

SRC = ["a red cat", "a red dog", "red red red", "a red car", "red sky", "the red house"]
TGT = ["a blue cat", "blue dog", "the blue sky", "blue", "a blue car", "blue water"]
SIZE = (32, 32)
RUN = dict(size=SIZE, num_inference_steps=4)


@pytest.fixture(scope="module", params=PIPELINES)
def pipe(request):
    return tiny_pipeline(request.param)


@pytest.fixture(scope="module")
def fitted(pipe):
    return lf.fit(pipe, None, SRC, TGT, sites="norms", steps=6, lr=0.02, progress=False, **RUN)


def images(pipe, prompts=("a red cat", "a dog"), **kw):
    extra = {"use_resolution_binning": False} if "PixArt" in type(pipe).__name__ else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pipe(list(prompts), num_inference_steps=2, output_type="pt", height=SIZE[0], width=SIZE[1],
                    generator=torch.Generator().manual_seed(0), **extra, **kw).images


# ------------------------------------------------------------------ sites and collection
def test_presets_name_component_modules(pipe):
    view = view_of(pipe)
    den = view.denoiser
    norms = view.resolve("norms")
    assert norms and all(s.startswith(den + ".") for s in norms)
    assert not any(s.endswith(("norm_out", "conv_norm_out")) for s in norms)  # not the final norm
    assert all(s.startswith("text_encoder.") for s in view.resolve("text_norms"))
    assert all(s.endswith(":in") for s in view.resolve("mlp_hidden"))
    assert view.resolve("attn_out") and view.resolve("mlp_out")
    if den == "unet":
        assert len(view.resolve("resnet_out")) > 0
        assert any("resnets" in s and s.endswith("norm1") for s in norms)  # GroupNorms of the ResNets
    with pytest.raises(lf.SteeringError, match="no module matches"):
        view.resolve("nothing_like_this.*")
    assert view_of(pipe) is view  # cached: a second steer_ sees the first handle


def test_collection_shapes_and_pooling(pipe):
    view = view_of(pipe)
    sites = view.resolve("norms")[:2] + view.resolve("text_norms")[:1]
    prompts = ["a red cat", "a dog", "x"]
    mean = collect_diffusion(pipe, prompts, sites, **RUN)
    widths = lf.sites.site_widths(view, sites)
    for s in sites:
        assert mean[s].shape == (3, widths[s]) and mean[s].dtype == torch.float32
    # tokens: every spatial position / token is a sample; its mean per prompt is the mean pooling
    tok = collect_diffusion(pipe, prompts, sites[:1], pooling="tokens", **RUN)[sites[0]]
    assert tok.shape[0] % 3 == 0 and tok.shape[0] > 3
    torch.testing.assert_close(tok.view(3, -1, tok.shape[1]).mean(1), mean[sites[0]], rtol=1e-5, atol=1e-5)
    # conditional half under CFG == the same prompts without CFG (first step: same latents)
    cfg = collect_diffusion(pipe, prompts, sites[:1], guidance_scale=7.0, **RUN)[sites[0]]
    torch.testing.assert_close(cfg, mean[sites[0]], rtol=1e-4, atol=1e-5)
    # two steps: mean over steps vs stacked per step
    two = collect_diffusion(pipe, prompts, sites[:1], steps=2, timestep_pooling="stack", **RUN)[sites[0]]
    assert two.shape == (6, widths[sites[0]])
    torch.testing.assert_close(two[:3], mean[sites[0]], rtol=1e-5, atol=1e-6)
    avg = collect_diffusion(pipe, prompts, sites[:1], steps=2, **RUN)[sites[0]]
    torch.testing.assert_close(avg, two.view(2, 3, -1).mean(0), rtol=1e-5, atol=1e-6)
    with pytest.raises(lf.SteeringError, match="pooling"):
        collect_diffusion(pipe, prompts, sites, pooling="last", **RUN)


# ------------------------------------------------------------------ fit
def test_lineas_fit_decreases_loss_and_leaves_pipeline_unchanged(pipe, fitted):
    loss = fitted.meta["train"]["loss"]
    assert min(loss[1:]) < loss[0]
    assert fitted.meta["model_type"].startswith("diffusers:") and fitted.meta["model_class"] == type(pipe).__name__
    assert fitted.nnz() > 0
    assert all(p.requires_grad for p in view_of(pipe).parameters())  # flags restored
    assert getattr(view_of(pipe), "_lineas_fast_handle", None) is None


@pytest.mark.parametrize("method", ["linear_act", "linear_act_incremental", "mean_act", "gaussian_ot"])
def test_act_methods_fit_on_a_pipeline(pipe, method):
    st = lf.fit(pipe, None, SRC, TGT, method=method, sites="norms", progress=False, **RUN)
    assert st.nnz() > 0 and st.meta["method"] == method.replace("_incremental", "")
    assert st.meta["hyperparams"]["incremental"] == method.endswith("incremental")
    assert set(st.sites) == set(view_of(pipe).resolve("norms"))


def test_actadd_default_site_on_a_pipeline(pipe):
    st = lf.fit(pipe, None, SRC, TGT, method="actadd", progress=False, **RUN)
    mlp = view_of(pipe).resolve("mlp_out")
    assert st.sites == [mlp[(len(mlp) - 1) // 2]] and st.nnz() > 0


def test_text_encoder_sites_fit_end_to_end(pipe):
    st = lf.fit(pipe, None, SRC, TGT, sites="text_norms", steps=3, lr=0.02, progress=False, **RUN)
    assert all(s.startswith("text_encoder.") for s in st.sites) and st.nnz() > 0


# ------------------------------------------------------------------ apply
def test_steering_changes_images_strength_zero_is_exact_and_remove_restores(pipe, fitted):
    base = images(pipe)
    with lf.steered(pipe, fitted, strength=1.0, mode="hooks"):
        steered = images(pipe)
    with lf.steered(pipe, fitted, strength=0.0, mode="hooks"):
        zero = images(pipe)
    assert (steered - base).abs().max() > 1e-4
    assert torch.equal(zero, base)
    assert torch.equal(images(pipe), base)


def test_fold_equals_hooks_and_unfold_is_exact(pipe, fitted):
    state = {k: v.clone() for k, v in view_of(pipe).state_dict().items()}
    with lf.steered(pipe, fitted, strength=0.7, mode="hooks"):
        hooks = images(pipe)
    with lf.steered(pipe, fitted, strength=0.7, mode="fold"):
        folded = images(pipe)
    torch.testing.assert_close(folded, hooks, rtol=0, atol=1e-5)
    after = view_of(pipe).state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


def test_fold_conv_and_linear_outputs(pipe):
    view = view_of(pipe)
    conv = [n for n, m in view.named_modules() if isinstance(m, torch.nn.Conv2d) and ".resnets." in n][:2]
    lin = [s.replace(":0", "") + ".to_out.0" for s in view.resolve("attn_out")[:2]]
    sites = conv + lin
    widths = lf.sites.site_widths(view, sites)
    g = torch.Generator().manual_seed(1)
    st = lf.Steering({s: 1 + 0.3 * torch.randn(widths[s], generator=g) for s in sites},
                     {s: 0.2 * torch.randn(widths[s], generator=g) for s in sites},
                     {"model_type": view.config.model_type})
    with lf.steered(pipe, st, mode="hooks"):
        hooks = images(pipe)
    with lf.steered(pipe, st, mode="fold"):
        folded = images(pipe)
    assert (hooks - images(pipe)).abs().max() > 1e-4
    torch.testing.assert_close(folded, hooks, rtol=0, atol=1e-5)


def test_fused_where_the_kernels_cover_the_norms(pipe, fitted):
    view = view_of(pipe)
    ln = [s for s in fitted.sites if isinstance(view.get_submodule(s), torch.nn.LayerNorm)]
    st = lf.Steering({s: fitted.scale[s] for s in ln}, {s: fitted.shift[s] for s in ln}, fitted.meta)
    with lf.steered(pipe, st, mode="hooks"):
        hooks = images(pipe)
    with lf.steered(pipe, st) as h:
        assert h.mode == "fused"  # every LayerNorm site is covered by lineas::norm_affine
        fused = images(pipe)
    torch.testing.assert_close(fused, hooks, rtol=0, atol=1e-5)
    with pytest.raises(lf.SteeringError, match="mode='hooks'"):
        lf.steer_(pipe, st, strength=torch.tensor([1.0, 0.5]), mode="fused")


@pytest.mark.parametrize("per_prompt_images", [1, 2])
def test_per_prompt_strength_in_one_batch_equals_separate_runs(pipe, fitted, per_prompt_images):
    strengths = [1.0, 0.3]
    kw = dict(num_images_per_prompt=per_prompt_images)
    with lf.steered(pipe, fitted, strength=torch.tensor(strengths)) as h:
        assert h.mode == "hooks"
        both = images(pipe, **kw)
    separate = []
    for i, s in enumerate(strengths):
        with lf.steered(pipe, fitted, strength=s, mode="hooks"):
            separate.append(images(pipe, **kw)[i * per_prompt_images:(i + 1) * per_prompt_images])
    torch.testing.assert_close(both, torch.cat(separate), rtol=0, atol=1e-6)


def test_routing_two_steerings_per_prompt(pipe, fitted):
    other = lf.Steering({s: 2 - fitted.scale[s] for s in fitted.sites}, {s: -fitted.shift[s] for s in fitted.sites},
                        fitted.meta)
    with lf.steered(pipe, {"a": fitted, "b": other}) as h:
        h.route(["b", None])
        routed = images(pipe)
    with lf.steered(pipe, other, mode="hooks"):
        only_b = images(pipe)
    base = images(pipe)
    torch.testing.assert_close(routed[0], only_b[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(routed[1], base[1], rtol=0, atol=1e-6)


# ------------------------------------------------------------------ artifacts
def test_save_load_and_the_backbone_guard(pipe, fitted, tmp_path):
    path = tmp_path / "st.safetensors"
    fitted.save(path)
    back = lf.Steering.load(path)
    assert back.sites == fitted.sites and all(torch.equal(back.scale[s], fitted.scale[s]) for s in back.sites)
    with lf.steered(pipe, back, mode="hooks"):
        a = images(pipe)
    with lf.steered(pipe, fitted, mode="hooks"):
        b = images(pipe)
    assert torch.equal(a, b)
    other = tiny_pipeline("pixart" if "StableDiffusion" in type(pipe).__name__ else "sd")
    with pytest.raises(lf.SteeringError, match="fitted on model_type"):
        lf.steer_(other, fitted)
    assert getattr(view_of(other), "_lineas_fast_handle", None) is None


def test_bake_reloads_in_stock_diffusers_or_refuses_untouched(pipe, tmp_path):
    from diffusers import DiffusionPipeline

    fresh = tiny_pipeline("sd" if "StableDiffusion" in type(pipe).__name__ else "pixart", seed=3)
    st = lf.fit(fresh, None, SRC, TGT, method="mean_act", sites="norms", progress=False, **RUN)
    with lf.steered(fresh, st, mode="hooks"):
        hooks = images(fresh)
    state = {k: v.clone() for k, v in view_of(fresh).state_dict().items()}
    if view_of(fresh).denoiser == "transformer":  # DiT pre-modulation LayerNorms have no affine to fold into
        with pytest.raises(lf.SteeringError, match="cannot bake"):
            lf.bake(fresh, st)
        after = view_of(fresh).state_dict()
        assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
        return
    lf.bake(fresh, st)
    torch.testing.assert_close(images(fresh), hooks, rtol=0, atol=1e-5)
    fresh.save_pretrained(tmp_path)
    stock = DiffusionPipeline.from_pretrained(tmp_path)
    stock.set_progress_bar_config(disable=True)
    torch.testing.assert_close(images(stock), hooks, rtol=0, atol=1e-5)


# ------------------------------------------------------------------ CLI
def test_cli_fit_and_generate_grid(tmp_path):
    from PIL import Image

    from lineas_fast.cli import main

    pipe = tiny_pipeline("sd")
    pipe.save_pretrained(tmp_path / "pipe")
    (tmp_path / "src.txt").write_text("\n".join(SRC))
    (tmp_path / "tgt.txt").write_text("\n".join(TGT))
    st = tmp_path / "st.safetensors"
    assert main(["fit", "--pipeline", str(tmp_path / "pipe"), "--source", str(tmp_path / "src.txt"),
                 "--target", str(tmp_path / "tgt.txt"), "--out", str(st), "--steps", "2", "--size", "32x32",
                 "--num-inference-steps", "4", "--threads", "1"]) == 0
    assert lf.Steering.load(st).meta["model_class"] == "StableDiffusionPipeline"
    grid = tmp_path / "grid.png"
    assert main(["generate", "--pipeline", str(tmp_path / "pipe"), "--steering", str(st), "--prompt", "a red cat",
                 "--prompt", "a dog", "--strengths", "0,1", "--size", "32x32", "--num-inference-steps", "2",
                 "--out", str(grid)]) == 0
    img = Image.open(grid)
    assert img.size[0] > 2 * 32 and img.size[1] > 2 * 32
    assert main(["fit", "--pipeline", str(tmp_path), "--source", str(tmp_path / "src.txt"),
                 "--target", str(tmp_path / "tgt.txt"), "--out", str(st)]) == 2  # no model_index.json


def test_top_level_collect_and_resolve_take_a_pipeline(pipe):
    sites = lf.resolve_sites(pipe, "norms")[:2]
    assert sites == view_of(pipe).resolve("norms")[:2]
    with view_of(pipe).options(size=SIZE, num_inference_steps=4):  # what lf.fit(..., size=...) sets for AcT
        acts = lf.collect(pipe, None, ["a red cat", "a dog"], sites, pooling="mean")
    assert all(acts[s].shape[0] == 2 for s in sites)
    with pytest.raises(lf.SteeringError, match="unknown pipeline option"):
        with view_of(pipe).options(height=32):
            pass


# ------------------------------------------------------------------ MM-DiT backbones (SD3, Flux)
@pytest.mark.parametrize("kind", MMDIT)
def test_mmdit_presets_fit_apply_and_fold(kind):
    pipe = tiny_pipeline(kind)
    kw = dict(max_sequence_length=16)
    view = view_of(pipe)
    assert any(s.endswith("attn:0") for s in view.resolve("attn_out"))  # joint attention: the image stream
    sites = view.resolve("norms") + view.resolve("attn_out") + view.resolve("mlp_hidden")
    st = lf.fit(pipe, None, SRC, TGT, method="mean_act", sites=sites, progress=False, pipe_kwargs=kw, **RUN)
    acts = collect_diffusion(pipe, SRC[:2], sites, pipe_kwargs=kw, **RUN)
    assert all(acts[s].shape == (2, st.meta["widths"][s]) for s in sites)
    base = images(pipe, **kw)
    with lf.steered(pipe, st, mode="hooks"):
        hooks = images(pipe, **kw)
    assert (hooks - base).abs().max() > 1e-4
    norms_only = lf.Steering({s: st.scale[s] for s in view.resolve("norms")},
                             {s: st.shift[s] for s in view.resolve("norms")}, st.meta)
    with lf.steered(pipe, norms_only, mode="hooks"):
        ref = images(pipe, **kw)
    with lf.steered(pipe, norms_only, mode="fold"):
        folded = images(pipe, **kw)
    torch.testing.assert_close(folded, ref, rtol=0, atol=1e-5)
    assert torch.equal(images(pipe, **kw), base)
    strengths = [1.0, 0.4]
    with lf.steered(pipe, st, strength=torch.tensor(strengths)):
        both = images(pipe, **kw)
    for i, s in enumerate(strengths):
        with lf.steered(pipe, st, strength=s, mode="hooks"):
            torch.testing.assert_close(both[i], images(pipe, **kw)[i], rtol=0, atol=1e-6)
