"""The layer-by-layer engine, checked against running the full model on every architecture."""

from __future__ import annotations

import copy
import json
from collections import defaultdict
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import torch
import torch.nn as nn
from torch import Tensor

from conftest import TINY_CONFIGS, VOCAB, build
from swiss_knife.arch import find_module, get_arch, get_blocks, get_module, iter_target_linears
from swiss_knife.calibration import (
    BlockCalibrator,
    BlockContext,
    ChannelNormObserver,
    HessianObserver,
    _same_call,
    accumulate_channel_abs_mean,
    accumulate_channel_sq_norm,
    accumulate_hessian,
    block_io_scores,
    capture_block_inputs,
    run_calibration,
    sequential_groups,
)
from swiss_knife.errors import UserInputError
from swiss_knife.targeting import TargetSpec, resolve_targets

# Longer than the tiny configs' sliding window (8), so sliding and full attention differ.
SEQ = 12
# The families the engine must handle; every other model type shares one of their layouts.
FAMILIES = ["llama", "gemma", "gemma2", "phi3", "gpt2", "opt", "gpt_neox"]


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    # Tiny matmuls are dominated by thread hand-off on a busy 2-core machine (see test_arch).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def samples(num: int = 5, seq: int = SEQ, seed: int = 0) -> Tensor:
    return torch.randint(3, VOCAB, (num, seq), generator=torch.Generator().manual_seed(seed))


class Recorder(BlockCalibrator):
    """Observes every linear into a Hessian; optionally zeroes one linear in `solve`."""

    def __init__(self, zero: str | None = None) -> None:
        self.zero = zero
        self.hessians: dict[str, HessianObserver] = {}
        self.outputs: dict[int, list[Tensor]] = defaultdict(list)

    def observe(self, name: str, module: nn.Module, inp: Tensor, out: Tensor) -> None:
        self.hessians.setdefault(name, HessianObserver()).update(inp)

    def solve(self, name: str, module: nn.Module) -> Mapping[str, float] | None:
        if name == self.zero:
            module.weight.zero_()
        return {"calls": 1.0}

    def observe_block(self, ctx: BlockContext, inp: Tensor, out: Tensor) -> None:
        self.outputs[ctx.index].append(out.clone())

    def output(self, index: int) -> Tensor:
        return torch.cat(self.outputs[index])  # (samples, seq, hidden)


def direct_hessians(model: nn.Module, ids: Tensor) -> dict[str, Tensor]:
    """2/n X^T X of every block linear, from hooks on one full forward pass."""
    inputs: dict[str, Tensor] = {}
    handles = []
    for name, module in iter_target_linears(model):

        def hook(_m: nn.Module, args: tuple[Tensor, ...], name: str = name) -> None:
            inputs[name] = args[0].reshape(-1, args[0].shape[-1]).double()

        handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(ids, use_cache=False)
    for handle in handles:
        handle.remove()
    return {name: (2 / x.shape[0] * x.T @ x).float() for name, x in inputs.items()}


def assert_hessians_close(found: dict[str, HessianObserver], expected: dict[str, Tensor]) -> None:
    assert set(found) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(found[name].hessian, tensor, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_identity_walk_reproduces_the_model(model_type: str) -> None:
    model = build(model_type)
    spec = get_arch(model)
    ids = samples()
    with torch.no_grad():
        reference = model(ids, use_cache=False, output_hidden_states=True)
    weights = {k: v.clone() for k, v in model.state_dict().items()}

    recorder = Recorder()
    report = run_calibration(model, ids, recorder, batch_size=2)  # batches of 2, 2, 1

    # hidden_states = (embeddings, block 0 out, ..., final_norm(last block out)) in 5.24.
    hidden = reference.hidden_states
    for index in range(len(get_blocks(model)) - 1):
        torch.testing.assert_close(recorder.output(index), hidden[index + 1], atol=1e-5, rtol=0)
    final_norm = find_module(model, spec.final_norm)
    assert final_norm is not None
    with torch.no_grad():
        last = final_norm(recorder.output(len(get_blocks(model)) - 1))
        logits = model(ids, use_cache=False).logits
    torch.testing.assert_close(last, hidden[-1], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, reference.logits, atol=1e-5, rtol=0)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert_hessians_close(recorder.hessians, direct_hessians(model, ids))

    # One record per block linear, in execution order, all untouched.
    assert [r.name for r in report.linears] == [name for name, _ in iter_target_linears(model)]
    assert all(r.tokens == ids.numel() and r.rel_error == 0.0 for r in report.linears)
    assert all(r.metrics == {"calls": 1.0} for r in report.linears)
    assert [b.rel_error for b in report.blocks] == [0.0] * len(get_blocks(model))
    assert report.tokens == ids.numel() and report.num_samples == 5 and report.seq_len == SEQ
    json.dumps(report.to_dict())


@pytest.mark.parametrize("model_type", FAMILIES)
def test_solved_changes_reach_later_groups_and_blocks(model_type: str) -> None:
    """Zeroing block 0's o_proj in the walk == zeroing it in the full model and running it."""
    model = build(model_type)
    spec = get_arch(model)
    target = f"{spec.blocks}.0.{spec.o_proj}"
    expected_model = copy.deepcopy(model)
    with torch.no_grad():
        get_module(expected_model, target).weight.zero_()
    ids = samples()
    with torch.no_grad():
        original = model(ids, use_cache=False).logits
        expected = expected_model(ids, use_cache=False, output_hidden_states=True)

    recorder = Recorder(zero=target)
    report = run_calibration(model, ids, recorder, batch_size=2)

    # Later groups of block 0 (the MLP) and all of block 1 observed the modified activations.
    assert_hessians_close(recorder.hessians, direct_hessians(expected_model, ids))
    torch.testing.assert_close(recorder.output(0), expected.hidden_states[1], atol=1e-5, rtol=0)
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    torch.testing.assert_close(logits, expected.logits, atol=1e-5, rtol=0)
    assert not torch.allclose(logits, original, atol=1e-3)
    # A zeroed linear reproduces none of its output; its block's output moved.
    assert report.linear(target).rel_error == pytest.approx(1.0)
    block_error = report.blocks[0].rel_error
    assert block_error is not None and block_error > 0


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "opt"])
def test_batch_size_and_offload_do_not_change_statistics(model_type: str) -> None:
    # gemma2 uses eager attention: its masks are (batch, 1, seq, seq), captured per batch.
    ids = samples(num=5)
    results = []
    for batch_size, offload in [(1, False), (4, False), (4, True)]:
        recorder = Recorder()
        run_calibration(build(model_type), ids, recorder, batch_size=batch_size,
                        offload_activations=offload)  # fmt: skip
        results.append(recorder)
    for other in results[1:]:
        assert_hessians_close(
            other.hessians, {name: h.hessian for name, h in results[0].hessians.items()}
        )
        torch.testing.assert_close(other.output(1), results[0].output(1), atol=1e-5, rtol=0)


def test_same_inputs_give_identical_statistics() -> None:
    first, second = Recorder(), Recorder()
    run_calibration(build("llama"), samples(), first, batch_size=2)
    run_calibration(build("llama"), samples(), second, batch_size=2)
    for name, observer in first.hessians.items():
        assert torch.equal(observer.hessian, second.hessians[name].hessian)


def test_only_the_current_block_moves_and_everything_is_restored() -> None:
    model = build("llama")
    model.train()
    blocks = get_blocks(model)
    moves: list[tuple[int, str]] = []
    for index, block in enumerate(blocks):

        def logged_to(*args: Any, _index: int = index, _to: Any = block.to, **kw: Any) -> Any:
            moves.append((_index, str(args[0] if args else kw["device"])))
            return _to(*args, **kw)

        block.to = logged_to  # type: ignore[method-assign]

    seen: list[tuple[int, list[tuple[int, str]], bool, list[str]]] = []

    class Spy(BlockCalibrator):
        def start_block(self, ctx: BlockContext) -> None:
            devices = [str(next(b.parameters()).device) for b in blocks]
            seen.append((ctx.index, list(moves), ctx.block.training, devices))

    run_calibration(model, samples(), Spy(), device="cpu", batch_size=2)
    # Block i is moved to the compute device for its turn and back before block i + 1.
    assert [(index, len(moved)) for index, moved, _, _ in seen] == [(0, 1), (1, 3)]
    assert [index for index, _ in moves] == [0, 0, 1, 1]
    assert all(device == "cpu" for _, device in moves)
    assert all(not training for _, _, training, _ in seen)
    assert model.training  # the flag is restored after the walk
    for block in blocks:
        del block.to
        assert "forward" not in block.__dict__  # capture recorders are gone
    assert all(not m._forward_hooks for m in model.modules())


def test_the_replay_writes_each_output_into_its_input_buffer() -> None:
    """In memory, block i's output goes into the buffers that held its input, so the walk does
    not allocate a fresh set of activations per block (heap growth, see `_store_output`)."""
    buffers: dict[int, list[int]] = {}

    class Spy(BlockCalibrator):
        def observe_block(self, ctx: BlockContext, inp: Tensor, out: Tensor) -> None:
            buffers.setdefault(ctx.index, []).append(inp.data_ptr())

    run_calibration(build("llama"), samples(), Spy(), batch_size=2)
    assert len(buffers) >= 2 and len(buffers[0]) == 3
    assert all(pointers == buffers[0] for pointers in buffers.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_walk_keeps_other_blocks_on_the_cpu() -> None:
    model = build("llama")
    ids = samples()
    placements: list[list[str]] = []

    class Spy(Recorder):
        def start_block(self, ctx: BlockContext) -> None:
            placements.append([next(b.parameters()).device.type for b in get_blocks(model)])
            placements[-1].append(model.model.embed_tokens.weight.device.type)

    on_gpu = Spy()
    run_calibration(model, ids, on_gpu, device="cuda", batch_size=2, offload_activations=True)
    assert placements == [["cuda", "cpu", "cpu"], ["cpu", "cuda", "cpu"]]
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(b.device.type == "cpu" for b in model.buffers())
    on_cpu = Recorder()
    run_calibration(build("llama"), ids, on_cpu, batch_size=2)
    for name, observer in on_cpu.hessians.items():
        torch.testing.assert_close(
            on_gpu.hessians[name].hessian.cpu(), observer.hessian, atol=1e-4, rtol=1e-4
        )


def test_errors_inside_the_walk_restore_the_model() -> None:
    model = build("gpt2")
    model.train()

    class Failing(BlockCalibrator):
        def solve(self, name: str, module: nn.Module) -> None:
            if name.startswith("transformer.h.1."):
                raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_calibration(model, samples(), Failing())
    assert model.training
    assert all("forward" not in block.__dict__ for block in get_blocks(model))
    assert all(not m._forward_hooks for m in model.modules())


def test_captured_arguments_are_per_block_per_batch_and_shared_when_equal() -> None:
    ids = samples(num=5)
    llama = capture_block_inputs(build("llama"), ids, batch_size=2)
    # sdpa without padding: no mask, one shared argument set for every block and batch.
    assert llama.num_batches == 3 and llama.num_samples == 5 and llama.distinct_calls() == 1
    assert llama.calls[0][0] is llama.calls[1][2]

    gemma2 = build("gemma2")  # eager attention, alternating sliding / full layers
    inputs = capture_block_inputs(gemma2, ids, batch_size=2, offload_activations=True)
    assert inputs.calls[0][0] is inputs.calls[0][1]  # same batch shape, same mask
    assert inputs.calls[0][0] is not inputs.calls[1][0]  # sliding vs full mask
    # Equal argument sets are stored once (at most 2 mask kinds x 2 batch shapes, not 2 x 3).
    calls = [call for per_block in inputs.calls for call in per_block]
    assert all((a is b) == _same_call(a, b) for a in calls for b in calls)
    assert inputs.distinct_calls() <= 4
    assert all(h.device.type == "cpu" for h in inputs.hidden)
    with torch.no_grad():
        embedded = gemma2(ids, use_cache=False, output_hidden_states=True).hidden_states[0]
    torch.testing.assert_close(torch.cat(inputs.hidden), embedded)  # includes Gemma's scaling
    # Eager attention in 5.24 builds one mask per batch row; older releases may pass None.
    mask = inputs.calls[1][0].kwargs["attention_mask"]
    assert mask is None or mask.shape == (2, 1, SEQ, SEQ)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma2"])
def test_block_io_scores(model_type: str) -> None:
    model = build(model_type)
    ids = samples()
    scores = block_io_scores(model, ids, batch_size=2)
    assert len(scores) == len(get_blocks(model))
    assert all(0.0 <= s <= 2.0 for s in scores)
    with torch.no_grad():
        hidden = model(ids, use_cache=False, output_hidden_states=True).hidden_states
    cos = torch.nn.functional.cosine_similarity(hidden[0], hidden[1], dim=-1)
    assert scores[0] == pytest.approx(1 - cos.mean().item(), abs=1e-5)
    assert block_io_scores(model, ids, batch_size=5, progress=True) == pytest.approx(scores)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ([[1, 2, 3]], "got list"),
        (torch.ones(2, 4), "got dtype torch.float32"),
        (torch.ones(2, 4, dtype=torch.int32), "got dtype torch.int32"),
        (torch.ones(4, dtype=torch.long), r"got shape \(4,\)"),
        (torch.ones(0, 4, dtype=torch.long), "empty"),
        (torch.ones(2, 0, dtype=torch.long), "empty"),
        (torch.ones(1, 65, dtype=torch.long), "65 tokens but the model handles at most 64"),
        (torch.full((1, 4), VOCAB, dtype=torch.long), "vocabulary has 128 entries"),
        (torch.full((1, 4), -1, dtype=torch.long), "vocabulary"),
    ],
)
def test_bad_samples_are_rejected_before_any_work(bad: Any, message: str) -> None:
    model = build("llama")
    with pytest.raises(UserInputError, match=message):
        run_calibration(model, bad, Recorder())
    with pytest.raises(UserInputError, match=message):
        capture_block_inputs(model, bad)


@pytest.mark.parametrize("batch_size", [0, -1, True, 1.5])
def test_bad_batch_size(batch_size: Any) -> None:
    with pytest.raises(UserInputError, match="batch_size must be a positive integer"):
        run_calibration(build("llama"), samples(), Recorder(), batch_size=batch_size)


def test_groups_must_name_block_linears_once() -> None:
    class Relative(BlockCalibrator):
        def groups(self, ctx: BlockContext) -> list[list[str]]:
            return [["self_attn.q_proj"]]

    class Twice(BlockCalibrator):
        def groups(self, ctx: BlockContext) -> list[list[str]]:
            name = ctx.full_name(ctx.spec.mlp_down)
            return [[name], [name]]

    with pytest.raises(ValueError, match=r"use full names such as 'model\.layers\.0\.self_attn\.q"):
        run_calibration(build("llama"), samples(), Relative())
    with pytest.raises(ValueError, match="more than one group"):
        run_calibration(build("llama"), samples(), Twice())


def test_sequential_groups_follow_the_architecture() -> None:
    def groups_of(model_type: str, **kwargs: Any) -> list[list[str]]:
        found: list[list[str]] = []

        class Grab(BlockCalibrator):
            def groups(self, ctx: BlockContext) -> list[list[str]]:
                if ctx.index == 1:
                    found.extend(sequential_groups(ctx, **kwargs))
                return []

        run_calibration(build(model_type), samples(num=1), Grab())
        return found

    p = "model.layers.1."
    assert groups_of("llama") == [
        [p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"],
        [p + "self_attn.o_proj"],
        [p + "mlp.gate_proj", p + "mlp.up_proj"],
        [p + "mlp.down_proj"],
    ]
    assert groups_of("phi3", true_sequential=False) == [
        [p + name for name in ("self_attn.qkv_proj", "self_attn.o_proj")]
        + [p + name for name in ("mlp.gate_up_proj", "mlp.down_proj")]
    ]
    h = "transformer.h.1."
    assert groups_of("gpt2", targets={h + "attn.c_attn", h + "mlp.c_proj"}) == [
        [h + "attn.c_attn"],
        [h + "mlp.c_proj"],
    ]


def test_targets_from_targeting_drive_the_walk() -> None:
    model = build("llama")
    targets = resolve_targets(model, TargetSpec(ignore=(r"re:.*\.mlp\..*",)))

    class Attention(Recorder):
        def groups(self, ctx: BlockContext) -> list[list[str]]:
            return sequential_groups(ctx, targets)

    recorder = Attention()
    report = run_calibration(model, samples(), recorder, measure_error=False)
    assert [r.name for r in report.linears] == list(targets)
    assert all(r.rel_error is None for r in report.linears)
    assert all(b.rel_error is None and b.groups == 2 for b in report.blocks)


def test_accumulators_match_direct_formulas() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(37, 6, generator=generator, dtype=torch.float64)
    hessian, sq_norm, abs_mean = torch.zeros(6, 6), torch.zeros(6), torch.zeros(6)
    counts = [0, 0, 0]
    hessian_observer, norm_observer = HessianObserver(), ChannelNormObserver()
    for chunk in x.split(10):  # uneven chunks: 10, 10, 10, 7
        hessian, counts[0] = accumulate_hessian(hessian, counts[0], chunk)
        sq_norm, counts[1] = accumulate_channel_sq_norm(sq_norm, counts[1], chunk)
        abs_mean, counts[2] = accumulate_channel_abs_mean(abs_mean, counts[2], chunk)
        hessian_observer.update(chunk.half())
        norm_observer.update(chunk)
    hessian, counts[0] = accumulate_hessian(hessian, counts[0], x[:0])  # empty chunk: no-op
    assert counts == [37, 37, 37] and hessian.dtype == torch.float32
    torch.testing.assert_close(hessian.double(), 2 / 37 * x.T @ x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sq_norm.double(), x.square().sum(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(abs_mean.double(), x.abs().mean(0), atol=1e-6, rtol=1e-6)
    expected_h = 2 / 37 * x.half().double().T @ x.half().double()
    torch.testing.assert_close(hessian_observer.hessian.double(), expected_h, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(norm_observer.l2_norm.double(), x.norm(dim=0), atol=1e-5, rtol=0)
    torch.testing.assert_close(norm_observer.abs_mean.double(), x.abs().mean(0))
    with pytest.raises(RuntimeError, match="no inputs"):
        _ = HessianObserver().hessian
    with pytest.raises(RuntimeError, match="no inputs"):
        _ = ChannelNormObserver().abs_mean


class _StoppingRecorder(Recorder):
    stop_after_group = True

    def __init__(self, zero: str | None = None) -> None:
        super().__init__(zero)
        self.calls: dict[str, int] = defaultdict(int)

    def observe(self, name: str, module: nn.Module, inp: Tensor, out: Tensor) -> None:
        self.calls[name] += 1
        super().observe(name, module, inp, out)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_stopping_after_the_group_changes_no_statistic(model_type: str) -> None:
    """Ending each pass once the group has run observes the same inputs and solves the same."""
    model = build(model_type)
    spec = get_arch(model)
    target = f"{spec.blocks}.0.{spec.o_proj}"
    ids = samples()
    full, stopping = Recorder(zero=target), _StoppingRecorder(zero=target)
    full_model = copy.deepcopy(model)
    full_report = run_calibration(full_model, ids, full, batch_size=2)
    report = run_calibration(model, ids, stopping, batch_size=2)
    assert set(stopping.hessians) == set(full.hessians)
    for name, observer in full.hessians.items():
        torch.testing.assert_close(stopping.hessians[name].hessian, observer.hessian, msg=name)
        assert stopping.calls[name] == 3  # once per mini-batch of 2, 2, 1 samples
    for index in full.outputs:
        torch.testing.assert_close(stopping.output(index), full.output(index))
    assert report.linear(target).rel_error == pytest.approx(1.0)
    assert report.blocks[0].rel_error == pytest.approx(full_report.blocks[0].rel_error)


def test_errors_are_measured_on_the_leading_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    import swiss_knife.calibration as calibration

    model = build("llama")
    spec = get_arch(model)
    target = f"{spec.blocks}.0.{spec.o_proj}"
    monkeypatch.setattr(calibration, "ERROR_MAX_TOKENS", SEQ)  # the first mini-batch only
    report = run_calibration(model, samples(), Recorder(zero=target), batch_size=2)
    # Still the exact error of a zeroed linear, now from the first mini-batch alone.
    assert report.linear(target).rel_error == pytest.approx(1.0)
    assert report.blocks[0].rel_error is not None and report.blocks[0].rel_error > 0


class _DtypeRecorder(Recorder):
    """A Recorder that also notes the dtype of every input it is given."""

    def __init__(self, zero: str | None = None) -> None:
        super().__init__(zero)
        self.dtypes: set[torch.dtype] = set()

    def observe(self, name: str, module: nn.Module, inp: Tensor, out: Tensor) -> None:
        self.dtypes |= {inp.dtype, out.dtype}
        super().observe(name, module, inp, out)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt"])
def test_bf16_passes_keep_fp32_statistics_close_to_the_fp32_walk(model_type: str) -> None:
    """precision='bf16': calibrators still get fp32 inputs, statistics move by bf16 rounding only,
    weights are never cast, and a zeroed linear still measures an exact error of 1."""
    model = build(model_type)
    spec = get_arch(model)
    target = f"{spec.blocks}.0.{spec.o_proj}"
    ids = samples()
    reference = Recorder(zero=target)
    run_calibration(copy.deepcopy(model), ids, reference, batch_size=2)

    recorder = _DtypeRecorder(zero=target)
    report = run_calibration(model, ids, recorder, batch_size=2, precision="bf16")
    assert recorder.dtypes == {torch.float32}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    moved = []
    for name, observer in reference.hessians.items():
        found, expected = recorder.hessians[name].hessian, observer.hessian
        # bf16 keeps 8 bits of mantissa: products of rounded activations differ by ~1 %.
        rel = float((found - expected).norm() / expected.norm())
        assert rel < 0.05, (name, rel)
        moved.append(rel > 0)
    # Inputs that come out of bf16 matmuls (o_proj's, down_proj's) did change.
    assert any(moved)
    for index in reference.outputs:
        out, expected = recorder.output(index), reference.output(index)
        assert out.dtype == torch.float32
        assert float((out - expected).norm() / expected.norm()) < 0.05
    assert report.linear(target).rel_error == pytest.approx(1.0, abs=1e-3)
    untouched = [r.rel_error for r in report.linears if r.name != target]
    assert untouched and all(error == 0.0 for error in untouched)


def test_unknown_calibration_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="precision"):
        run_calibration(build("llama"), samples(), Recorder(), precision="fp8")


def test_precision_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    import swiss_knife.calibration as calibration
    from swiss_knife.calibration import resolve_precision

    cpu = torch.device("cpu")
    monkeypatch.setattr(calibration, "fast_bf16_matmul", lambda device: False)
    assert resolve_precision("auto", cpu, torch.float32) == "float32"
    assert resolve_precision("bf16", cpu, torch.float32) == "bf16-autocast"
    assert resolve_precision("fp32", cpu, torch.float32) == "float32"
    monkeypatch.setattr(calibration, "fast_bf16_matmul", lambda device: True)
    assert resolve_precision("auto", cpu, torch.float32) == "bf16-autocast"
    # A 16-bit model always runs in its own dtype: autocast to bf16 would lose fp16's mantissa.
    assert resolve_precision("auto", cpu, torch.float16) == "float16"
    assert resolve_precision("bf16", cpu, torch.bfloat16) == "bfloat16"
    report = run_calibration(build("llama"), samples(), Recorder(), precision="auto")
    assert report.precision == "bf16-autocast" and report.to_dict()["precision"] == "bf16-autocast"


class _PassSolver(Recorder):
    """Zeroes half of every linear's input columns, solving during the pass when allowed."""

    def __init__(self, during: bool) -> None:
        super().__init__()
        self.solve_during_pass = during

    def groups(self, ctx: BlockContext) -> list[list[str]]:
        return sequential_groups(ctx, true_sequential=True)

    def solve(self, name: str, module: nn.Module) -> Mapping[str, float] | None:
        with torch.no_grad():
            module.weight[..., ::2] = 0.0
        return None


@pytest.mark.parametrize("model_type", FAMILIES)
def test_one_pass_walk_equals_the_group_passes(model_type: str) -> None:
    """solve_during_pass with one mini-batch: the same statistics, weights and outputs as the
    true-sequential group passes, in one pass per block and without the block error."""
    model = build(model_type)
    ids = samples(4)
    grouped, single = _PassSolver(during=False), _PassSolver(during=True)
    grouped_model = copy.deepcopy(model)
    grouped_report = run_calibration(grouped_model, ids, grouped, batch_size=4)
    report = run_calibration(model, ids, single, batch_size=4)
    for name, observer in grouped.hessians.items():
        torch.testing.assert_close(single.hessians[name].hessian, observer.hessian, msg=name)
    for index in grouped.outputs:
        torch.testing.assert_close(single.output(index), grouped.output(index))
    for key, value in grouped_model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, msg=key)
    for mine, theirs in zip(report.linears, grouped_report.linears, strict=True):
        assert mine.name == theirs.name and mine.tokens == theirs.tokens
        assert mine.rel_error == pytest.approx(theirs.rel_error, rel=1e-4)
    assert all(b.rel_error is None for b in report.blocks)
    # Several mini-batches: the engine falls back to the group passes.
    fallback = _PassSolver(during=True)
    again = run_calibration(build(model_type), ids, fallback, batch_size=2)
    assert all(b.rel_error is not None for b in again.blocks)
