"""Distillation on tiny random models: the losses against float64 references, the student's
initialisation, a whole run (loss down, a loadable checkpoint, a report), KD against no KD on the
teacher's distribution, resume after a kill reproducing the uninterrupted run, and a tokenizer
mismatch refused."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaForCausalLM,
    TrainerCallback,
)

from slimserve.compression.calibration import token_windows
from slimserve.distill.config import DistillConfig, LossOptions, SequenceKD, StudentInit
from slimserve.distill.generations import _turns_from_file, pack, teacher_sequences
from slimserve.distill.losses import aligned_hidden, distillation_loss, divergence
from slimserve.distill.run import REPORT, DistillReport, distill
from slimserve.distill.student import kept_blocks, make_student, same_tokenizer
from slimserve.serve.replica.server import VariantServer

from .conftest import tiny_llama
from .online_helpers import online_config

TEXT = " ".join(
    f"The keeper of lighthouse number {i} climbs {i % 7 + 2} flights of stairs at dusk, "
    f"lights the lamp, and writes {i % 5 + 1} lines in the log before the tide turns."
    for i in range(400)
)


def _teacher(blocks: int = 4, seed: int = 0) -> LlamaForCausalLM:
    # A wide init gives peaked next-token distributions, unlike a near-uniform one.
    return tiny_llama(seed=seed, layers=blocks, initializer_range=0.3)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("teacher")
    _teacher().save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "text.txt").write_text(TEXT)
    return path


def _config(teacher_dir: Path, out: Path, **changes) -> DistillConfig:
    data = {
        "teacher": str(teacher_dir),
        "data": {"source": str(teacher_dir / "text.txt"), "seq_len": 32},
        "train": {"steps": 12, "batch_size": 4, "learning_rate": 3e-3, "warmup_steps": 0}
        | changes.pop("train", {}),
        "eval": {"tokens": 256, "context": 32, "decode_tokens": 4},
        "output": str(out),
    }
    data.update(changes)
    return DistillConfig.model_validate(data)


def _reference_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, t: float) -> torch.Tensor:
    """KL(p || q) per token in float64 from the definition."""
    p = torch.softmax(p_logits.double() / t, -1)
    q = torch.softmax(q_logits.double() / t, -1)
    return (p * (p.log() - q.log())).sum(-1)


@pytest.mark.parametrize("shape", [(2, 5, 7), (1, 3, 49152), (3, 1, 2)])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_divergences_match_float64_definitions(shape, temperature):
    generator = torch.Generator().manual_seed(sum(shape))
    student = torch.randn(shape, generator=generator) * 3
    teacher = torch.randn(shape, generator=generator) * 3
    mask = torch.ones(shape[:-1], dtype=torch.bool)
    scale = temperature**2
    forward = divergence(student, teacher, mask, "forward", temperature)
    reverse = divergence(student, teacher, mask, "reverse", temperature)
    expected_forward = _reference_kl(teacher, student, temperature).mean() * scale
    expected_reverse = _reference_kl(student, teacher, temperature).mean() * scale
    torch.testing.assert_close(forward.double(), expected_forward, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(reverse.double(), expected_reverse, rtol=1e-4, atol=1e-5)
    p = torch.softmax(teacher.double() / temperature, -1)
    q = torch.softmax(student.double() / temperature, -1)
    m = 0.5 * p + 0.5 * q
    jsd = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
    measured = divergence(student, teacher, mask, "jsd", temperature, beta=0.5)
    torch.testing.assert_close(measured.double(), jsd.mean() * scale, rtol=1e-4, atol=1e-5)


def test_divergences_at_their_extremes():
    """Zero for equal distributions; finite for saturating logits (one-hot against one-hot)."""
    logits = torch.randn(2, 4, 11)
    mask = torch.ones(2, 4, dtype=torch.bool)
    for kind in ("forward", "reverse", "jsd"):
        assert divergence(logits, logits, mask, kind, 2.0).abs() < 1e-6
    hot = torch.full((1, 2, 11), -1e4)
    hot[..., 0] = 1e4
    other = torch.full((1, 2, 11), -1e4)
    other[..., 1] = 1e4
    for kind in ("forward", "reverse", "jsd"):
        value = divergence(hot, other, torch.ones(1, 2, dtype=torch.bool), kind, 1.0)
        assert torch.isfinite(value) and value > 0
    # JSD is bounded by log 2 (times T^2).
    jsd = divergence(hot, other, torch.ones(1, 2, dtype=torch.bool), "jsd", 1.0)
    assert jsd <= torch.log(torch.tensor(2.0)) + 1e-5


def test_masked_tokens_do_not_count():
    student, teacher = torch.randn(1, 4, 9), torch.randn(1, 4, 9)
    mask = torch.tensor([[True, True, False, False]])
    whole = divergence(student[:, :2], teacher[:, :2], mask[:, :2], "forward", 1.0)
    torch.testing.assert_close(divergence(student, teacher, mask, "forward", 1.0), whole)
    labels = torch.tensor([[5, 6, 7, -100, -100]])
    options = LossOptions(kd_weight=0, lm_weight=1)
    logits = torch.randn(1, 5, 9)
    loss, parts = distillation_loss(logits, logits, labels, options)
    expected = torch.nn.functional.cross_entropy(logits[0, :2], labels[0, 1:3])
    torch.testing.assert_close(loss, expected)
    assert set(parts) == {"lm"}


def test_student_initialisation_keeps_the_chosen_blocks(tokenizer):
    teacher = _teacher(blocks=6)
    assert kept_blocks(teacher, StudentInit()) == [0, 2, 4]
    assert kept_blocks(teacher, StudentInit(keep=[5, 1, 1])) == [1, 5]
    with pytest.raises(ValueError, match=r"0\.\.5"):
        kept_blocks(teacher, StudentInit(keep=[6]))
    by_importance = kept_blocks(
        teacher, StudentInit(keep="importance", layers=2, calibration_samples=2), tokenizer
    )
    assert len(by_importance) == 2 and by_importance == sorted(by_importance)
    student = make_student(teacher, [1, 4])
    assert student.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]
    torch.testing.assert_close(
        student.model.layers[1].mlp.up_proj.weight, teacher.model.layers[4].mlp.up_proj.weight
    )
    ids = torch.randint(0, 100, (1, 8))
    assert student(ids).logits.shape == (1, 8, 49152)
    assert teacher.config.num_hidden_layers == 6  # the teacher is left whole


def test_a_run_writes_a_loadable_student_and_its_report(teacher_dir, tmp_path, tokenizer):
    out = tmp_path / "student"
    report = distill(_config(teacher_dir, out), progress=False)
    assert report.finished and report.steps == 12 and report.kept_blocks == [0, 2]
    assert report.losses[-1]["loss"] < report.losses[0]["loss"]
    assert {"loss_kd", "loss_lm"} <= set(report.losses[0])
    assert report.student.perplexity < report.layer_dropped.perplexity
    assert report.student.parameters < report.teacher.parameters
    assert report.student.blocks == 2 and report.teacher.blocks == 4
    student = AutoModelForCausalLM.from_pretrained(out)
    assert student.config.num_hidden_layers == 2
    assert same_tokenizer(tokenizer, AutoTokenizer.from_pretrained(out)) is None
    assert (out / "generation_config.json").is_file()
    assert not (out / "checkpoints").exists()
    assert json.loads((out / REPORT).read_text())["finished"]
    again = distill(_config(teacher_dir, out), progress=False)  # finished: reused as it is
    assert again == report


def _kl_to_teacher(teacher_dir: Path, student_dir: Path, tokenizer) -> float:
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    ids = token_windows(tokenizer, TEXT[-4000:], 32, 8)
    with torch.no_grad():
        t, s = teacher(ids).logits, student(ids).logits
    return float(divergence(s, t, torch.ones(ids.shape, dtype=torch.bool), "forward", 1.0))


def test_kd_beats_no_kd_on_the_teachers_distribution(teacher_dir, tmp_path, tokenizer):
    with_kd = _config(teacher_dir, tmp_path / "kd", loss={"kd_weight": 1.0, "lm_weight": 0.0})
    without = _config(teacher_dir, tmp_path / "lm", loss={"kd_weight": 0.0, "lm_weight": 1.0})
    distill(with_kd, progress=False)
    distill(without, progress=False)
    kd = _kl_to_teacher(teacher_dir, tmp_path / "kd", tokenizer)
    lm = _kl_to_teacher(teacher_dir, tmp_path / "lm", tokenizer)
    assert kd < lm, (kd, lm)


class _Killed(Exception):
    pass


class _KillAt(TrainerCallback):
    """Dies like a killed process right after step `step` (its checkpoint, if any, written)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            raise _Killed


def test_resume_after_a_kill_reproduces_the_uninterrupted_run(teacher_dir, tmp_path):
    train = {"steps": 8, "checkpoint_every": 4}
    straight = distill(_config(teacher_dir, tmp_path / "a", train=train), progress=False)
    interrupted = _config(teacher_dir, tmp_path / "b", train=train)
    with pytest.raises(_Killed):
        distill(interrupted, progress=False, callbacks=[_KillAt(4)])
    assert (tmp_path / "b" / "checkpoints" / "checkpoint-4").is_dir()
    resumed = distill(interrupted, progress=False)
    assert resumed.resumed_from_step == 4 and resumed.finished
    a = load_file(tmp_path / "a" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    assert straight.losses[-1]["loss"] == pytest.approx(resumed.losses[-1]["loss"], rel=1e-4)


class _CtrlCAt(TrainerCallback):
    """Presses Ctrl-C (a real SIGINT to this process) at the end of step `step`."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_stops_cleanly_at_a_checkpoint_and_the_run_continues_from_it(teacher_dir, tmp_path):
    train = {"steps": 8, "checkpoint_every": 100}  # only the stop writes a checkpoint
    straight = distill(_config(teacher_dir, tmp_path / "a", train=train), progress=False)
    stopped_config = _config(teacher_dir, tmp_path / "b", train=train)
    stopped = distill(stopped_config, progress=False, callbacks=[_CtrlCAt(3)])
    # The flag is read at the next step's end: it stops there, saved, not finished.
    assert not stopped.finished and stopped.steps == 4
    assert (tmp_path / "b" / "checkpoints" / "checkpoint-4").is_dir()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    resumed = distill(stopped_config, progress=False)
    assert resumed.resumed_from_step == 4 and resumed.finished
    a = load_file(tmp_path / "a" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    assert straight.losses[-1]["loss"] == pytest.approx(resumed.losses[-1]["loss"], rel=1e-4)


def test_a_tokenizer_or_template_mismatch_is_named(tokenizer):
    assert same_tokenizer(tokenizer, tokenizer) is None
    other = AutoTokenizer.from_pretrained(Path(tokenizer.name_or_path))
    other.chat_template = "{{ messages }}"
    assert same_tokenizer(tokenizer, other) == "the chat templates differ"
    other = AutoTokenizer.from_pretrained(Path(tokenizer.name_or_path))
    other.add_tokens(["<extra-token>"])
    assert same_tokenizer(tokenizer, other) == "the vocabularies differ"


def test_report_round_trips(teacher_dir, tmp_path):
    report = distill(_config(teacher_dir, tmp_path / "c", train={"steps": 2}), progress=False)
    assert DistillReport.model_validate_json(report.model_dump_json()) == report


def _served(teacher_dir: Path, student) -> VariantServer:
    config = online_config(
        teacher_dir,
        variants={"full": {}, "student": {"student": student}},
        routing={"split": {"full": 1, "student": 1}},
        self_bench={"enabled": False},
    )
    return VariantServer("student", config.model_dump(mode="json"))


def test_a_variant_distills_its_student_on_first_start_and_serves_it(teacher_dir, tmp_path):
    inline = _config(teacher_dir, tmp_path / "first-start", train={"steps": 2})
    server = _served(teacher_dir, inline.model_dump(mode="json"))
    try:
        assert server.failure is None
        assert server.model_name == str(tmp_path / "first-start")
    finally:
        server.engine.shutdown()
    assert DistillReport.model_validate_json((tmp_path / "first-start" / REPORT).read_text())


def test_a_student_that_cannot_replace_the_model_is_refused_with_the_reason(
    teacher_dir, tmp_path, tokenizer
):
    out = tmp_path / "student"
    distill(_config(teacher_dir, out, train={"steps": 2}), progress=False)
    other = AutoTokenizer.from_pretrained(out)
    other.chat_template = "{{ messages }}"
    other.save_pretrained(out)
    server = _served(teacher_dir, str(out))
    assert "chat templates differ" in server.failure
    wrong_teacher = _config(tmp_path / "elsewhere", tmp_path / "never")
    server = _served(teacher_dir, wrong_teacher.model_dump(mode="json"))
    assert "not the model this config serves" in server.failure
    assert not (tmp_path / "never").exists()


def test_sequence_kd_and_hidden_alignment_train_on_the_teachers_generations(teacher_dir, tmp_path):
    plain = _config(teacher_dir, tmp_path / "plain", train={"steps": 2})
    richer = _config(
        teacher_dir,
        tmp_path / "richer",
        train={"steps": 4},
        data={
            "source": str(teacher_dir / "text.txt"),
            "seq_len": 32,
            "sequence_kd": {"prompts": 4, "prompt_tokens": 8, "new_tokens": 24},
        },
        loss={"divergence": "reverse", "hidden_weight": 1.0},
    )
    base = distill(plain, progress=False)
    report = distill(richer, progress=False)
    assert report.windows == base.windows + 4  # one 32-token window per generation
    generated = torch.load(tmp_path / "richer" / "teacher-generations.pt")["sequences"]
    assert [len(sequence) for sequence in generated] == [32] * 4
    assert {"loss_kd", "loss_hidden"} <= set(report.losses[0])


def _chat_kd(teacher_dir: Path, tokenizer, user_turns, prompts: int = 5) -> list[torch.Tensor]:
    options = SequenceKD(
        style="chat",
        user_turns=user_turns,
        prompts=prompts,
        prompt_tokens=12,
        new_tokens=10,
        batch_size=2,  # ragged batches: left padding, a last batch of one
    )
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    windows = token_windows(tokenizer, TEXT, 32, 8)
    return teacher_sequences(teacher, tokenizer, windows, options, teacher_dir / "gen.pt")


@pytest.mark.parametrize("source", ["text", "teacher", "file.txt", "file.jsonl"])
def test_chat_sequence_kd_is_the_teachers_answers_in_its_chat_template(
    teacher_dir, tmp_path, tokenizer, source
):
    turns = [f"Which lighthouse has {i} flights of stairs?" for i in range(3)]
    user_turns = source
    if source.startswith("file"):
        user_turns = tmp_path / source
        lines = [json.dumps({"prompt": t}) for t in turns] if source.endswith("l") else turns
        user_turns.write_text("\n".join(lines))
    (teacher_dir / "gen.pt").unlink(missing_ok=True)
    sequences = _chat_kd(teacher_dir, tokenizer, user_turns)
    assert len(sequences) == (3 if source.startswith("file") else 5)
    header = tokenizer.apply_chat_template(
        [{"role": "user", "content": "X"}], tokenize=False, add_generation_prompt=True
    )
    assistant = header[header.index("X") + 1 :]  # what closes the user turn, opens the answer
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    for i, sequence in enumerate(sequences):
        text = tokenizer.decode(sequence)
        assert text.startswith(header[: header.index("X")]), text
        prompt = text.split(assistant, 1)[0]
        if source.startswith("file"):
            assert prompt.endswith(turns[i])
        elif source == "text":
            assert "text" in prompt and "lighthouse" in prompt  # an instruction over a passage
        prompt_ids = tokenizer(prompt + assistant, add_special_tokens=False).input_ids
        new = sequence[len(prompt_ids) :].tolist()
        assert 1 <= len(new) <= 10
        eos = tokenizer.eos_token_id
        assert eos not in new[:-1] and (len(new) == 10 or new[-1] == eos)
        # The teacher's own greedy answer, as it writes it alone (no padding beside it).
        alone = teacher.generate(
            torch.tensor([prompt_ids]), max_new_tokens=10, do_sample=False, pad_token_id=eos
        )[0, len(prompt_ids) :].tolist()
        assert new == alone[: len(new)]
    again = _chat_kd(teacher_dir, tokenizer, user_turns)  # from the cache, unchanged
    assert all(torch.equal(a, b) for a, b in zip(again, sequences, strict=True))


def test_packing_joins_generations_into_whole_windows():
    sequences = [torch.arange(5), torch.arange(10, 17), torch.arange(20, 23)]
    windows = pack(sequences, 4)
    # 15 tokens: three whole windows, the tail (22) dropped.
    assert windows.tolist() == [[0, 1, 2, 3], [4, 10, 11, 12], [13, 14, 15, 16]]
    with pytest.raises(ValueError, match="fewer than one 32-token window"):
        pack(sequences, 32)


def test_user_turns_belong_to_chat_and_a_bad_file_is_named(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="style: chat only"):
        SequenceKD(user_turns="text")
    bad = tmp_path / "turns.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match=r"turns.jsonl:2: each line needs a \"prompt\" string"):
        _turns_from_file(bad)


def test_zero_steps_writes_the_layer_dropped_model_as_it_is(teacher_dir, tmp_path):
    out = tmp_path / "dropped"
    report = distill(_config(teacher_dir, out, train={"steps": 0}), progress=False)
    assert report.finished and report.steps == 0 and report.losses == []
    assert report.student == report.layer_dropped and report.recovered_fraction() == 0
    saved = AutoModelForCausalLM.from_pretrained(out)
    expected = make_student(AutoModelForCausalLM.from_pretrained(teacher_dir), report.kept_blocks)
    for (name, value), (_, reference) in zip(
        saved.state_dict().items(), expected.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(value, reference, rtol=0, atol=0, msg=name)


def test_the_hidden_state_term_pairs_copied_blocks_and_its_gradient_lowers_it():
    teacher = _teacher(blocks=4)
    student = make_student(teacher, [0, 2])
    ids = torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        taught = teacher(ids, output_hidden_states=True).hidden_states
    options = LossOptions(kd_weight=0, lm_weight=0, hidden_weight=1)

    def hidden_loss() -> torch.Tensor:
        out = student(ids, output_hidden_states=True)
        s, t = aligned_hidden(out.hidden_states, taught, [0, 2])
        assert len(s) == 2  # student block 0 against teacher block 0, then the final states
        return distillation_loss(out.logits, out.logits, ids, options, s, t)[0]

    first = hidden_loss()
    out = student(ids, output_hidden_states=True)
    s, t = aligned_hidden(out.hidden_states, taught, [0, 2])
    torch.testing.assert_close(s[0], t[0])  # a copied block on the same input: equal
    first.backward()
    with torch.no_grad():
        for parameter in student.parameters():
            if parameter.grad is not None:
                parameter -= 1e-3 * parameter.grad
    assert hidden_loss() < first


def test_a_narrower_student_keeps_the_teachers_strongest_ffn_channels(teacher_dir, tmp_path):
    narrow = {"keep": "every-other", "ffn_keep_fraction": 0.5}
    untrained = distill(
        _config(teacher_dir, tmp_path / "narrow0", student=narrow, train={"steps": 0}),
        progress=False,
    )
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "narrow0")
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    assert saved.config.intermediate_size == 64 and teacher.config.intermediate_size == 128
    for student_block, teacher_block in zip(saved.model.layers, [0, 2], strict=True):
        rows = student_block.mlp.gate_proj.weight
        reference = teacher.model.layers[teacher_block].mlp.gate_proj.weight
        assert rows.shape == (64, 64)
        # every kept row is one of the teacher's, unchanged
        assert all((reference == row).all(dim=1).any() for row in rows)
    whole_width = distill(
        _config(teacher_dir, tmp_path / "wide0", train={"steps": 0}), progress=False
    )
    assert untrained.student.parameters < whole_width.student.parameters
    trained = distill(
        _config(teacher_dir, tmp_path / "narrow", student=narrow, train={"steps": 8}),
        progress=False,
    )
    assert trained.losses[-1]["loss"] < trained.losses[0]["loss"]
    assert trained.student.perplexity < trained.layer_dropped.perplexity
