"""Chat data: ``messages`` and ``prompt``/``completion`` records, and the ``chat`` template that
renders each model's own chat template (teacher and student differ, the answer text does not)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from cot2align_ds.alignment.pair_check import template_findings
from cot2align_ds.data.collator import DistillCollator
from cot2align_ds.data.examples import make_examples
from cot2align_ds.data.records import Record, RecordError, read_records
from cot2align_ds.data.templates import COT_TRIGGER, ChatTemplateError, cot_prompt, standard_prompt
from cot2align_ds.inference.generation import chat_end_text
from cot2align_ds.models.real_models import default_cache_dir

# Two different conversation formats, as two model families write them.
BRACKETS = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)
TURNS = (
    "{% for m in messages %}<turn {{ m['role'] }}>{{ m['content'] }}<end>\n{% endfor %}"
    "{% if add_generation_prompt %}<turn assistant>{% endif %}"
)


def _write(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_messages_and_prompt_completion_records_are_read(tmp_path):
    path = _write(tmp_path, [
        {"prompt": "2 + 2?", "completion": "4"},
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "3 + 3?"},
                      {"role": "assistant", "content": "6"}], "rationale": "3 and 3 make 6."},
        {"instruction": "5 + 5?", "output": "10"},
    ])  # fmt: skip
    plain, chat, alpaca = read_records(path)
    assert (plain.instruction, plain.output, plain.messages) == ("2 + 2?", "4", None)
    assert (chat.instruction, chat.output, chat.rationale) == ("3 + 3?", "6", "3 and 3 make 6.")
    assert [m.role for m in chat.messages] == ["system", "user"]
    assert alpaca.output == "10"


@pytest.mark.parametrize(("row", "fragment"), [
    ({"messages": [{"role": "user", "content": "hi"}]}, "end with the assistant's answer"),
    ({"messages": [{"role": "system", "content": "x"}, {"role": "assistant", "content": "y"}]},
     "no user turn"),
    ({"messages": "hello"}, "a list of {role, content} objects"),
    ({"completion": "4"}, "field 'prompt'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]},
     "field 'output' is empty"),
])  # fmt: skip
def test_malformed_chat_records_name_file_line_and_field(tmp_path, row, fragment):
    path = _write(tmp_path, [{"prompt": "ok", "completion": "ok"}, row])
    with pytest.raises(RecordError) as info:
        read_records(path)
    assert f"{path}:2: " in str(info.value) and fragment in str(info.value)


def _tokenizers(workspace):
    student = AutoTokenizer.from_pretrained(workspace["student_tok"])
    teacher = AutoTokenizer.from_pretrained(workspace["teacher_tok"])
    student.chat_template, teacher.chat_template = BRACKETS, TURNS
    return student, teacher


def test_each_model_gets_its_own_template_and_the_cot_view_starts_the_answer(workspace):
    student, teacher = _tokenizers(workspace)
    record = Record(id="r", instruction="What is 2 + 3?", input="", output="5")
    assert standard_prompt(record, "chat", student) == "[user] What is 2 + 3?\n[assistant] "
    assert standard_prompt(record, "chat", teacher) == (
        "<turn user>What is 2 + 3?<end>\n<turn assistant>"
    )
    cot = cot_prompt(record, "chat", teacher)
    assert "step by step" in cot and cot.endswith("<turn assistant>" + COT_TRIGGER)
    assert chat_end_text(teacher) == "<end>" and chat_end_text(student) == ""
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        standard_prompt(record, "chat", AutoTokenizer.from_pretrained(workspace["student_tok"]))


def test_the_collator_renders_prompts_per_tokenizer_and_ends_answers_with_the_turn(workspace):
    student, teacher = _tokenizers(workspace)
    records = [
        Record(id="a", instruction="Add 2 and 3.", input="", output="5", rationale="2 + 3 = 5."),
    ]
    examples = make_examples(records, template="chat", cot_records="all")
    collator = DistillCollator(
        student, teacher, max_prompt_tokens=60, max_total_tokens=100, cot_views=True,
        alignment="offsets",
    )  # fmt: skip
    batch = collator(examples)
    for side, tokenizer in ((batch.student, student), (batch.teacher, teacher)):
        # The prompt is the tokenizer's own rendering, tokenized without extra special tokens.
        prompt_length = int((side.labels[0] != -100).nonzero()[0]) + 1
        rendered = examples[0].prompt_for(tokenizer)
        expected = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        assert side.input_ids[0, :prompt_length].tolist() == expected
    assert examples[0].prompt_for(student) != examples[0].prompt_for(teacher)
    # The teacher's answer ends with its end-of-turn marker, the student's (none) with EOS.
    teacher_answer = batch.teacher.labels[0][batch.teacher.labels[0] != -100].tolist()
    end_ids = teacher("<end>", add_special_tokens=False)["input_ids"]
    assert teacher_answer[-len(end_ids) :] == end_ids
    student_answer = batch.student.labels[0][batch.student.labels[0] != -100].tolist()
    assert student_answer[-1] == student.eos_token_id
    # The answer tokens align across the two tokenizations, end markers included.
    assert (batch.aligned_teacher_pos_BS >= 0).any()
    assert batch.standard.valid_C.all()


def test_pair_check_warns_about_an_instruct_model_fed_plain_prompts(workspace):
    student, teacher = _tokenizers(workspace)
    tokenizers = {"teacher": teacher, "student": student}
    problems, warnings = template_findings(tokenizers, "alpaca")
    assert not problems and len(warnings) == 2 and "data.template: chat" in warnings[0]
    plain = {"teacher": AutoTokenizer.from_pretrained(workspace["teacher_tok"]),
             "student": student}  # fmt: skip
    problems, _ = template_findings(plain, "chat")
    assert problems == [
        "teacher tokenizer has no chat template, but data.template is chat; use alpaca or compact"
    ]


def test_the_real_pair_renders_its_own_chat_templates():
    root = default_cache_dir()
    paths = root / "smollm2-135m-instruct", root / "gemma3-270m"
    if not all((path / "tokenizer.json").is_file() for path in paths):
        pytest.skip("the real models are not installed (make real-models)")
    student, teacher = (AutoTokenizer.from_pretrained(path) for path in paths)
    record = Record(id="r", instruction="What is 2 + 3?", input="", output="5")
    assert "<|im_start|>user" in standard_prompt(record, "chat", student)
    assert "<start_of_turn>user" in standard_prompt(record, "chat", teacher)
    assert chat_end_text(student) == "<|im_end|>" and chat_end_text(teacher) == "<end_of_turn>"
    examples = make_examples([record], template="chat")
    batch = DistillCollator(student, teacher, max_prompt_tokens=64, max_total_tokens=96,
                            alignment="offsets")(examples)  # fmt: skip
    teacher_ids = batch.teacher.input_ids[0].tolist()
    assert teacher_ids.count(teacher.bos_token_id) == 1  # the template's BOS, not a second one
    end_of_turn = teacher.convert_tokens_to_ids("<end_of_turn>")
    assert batch.teacher.labels[0][batch.teacher.labels[0] != -100].tolist()[-1] == end_of_turn


def test_a_hugging_face_dataset_folder_is_read_split_by_split(tmp_path):
    """``data.hub_dataset``: what ``datasets.load_dataset`` reads (a hub name, or here a local
    folder with train and validation files), rows in any record shape."""
    from cot2align_ds.data.records import read_hub_records

    folder = tmp_path / "my_dataset"
    folder.mkdir()
    _write(folder, [{"messages": [{"role": "user", "content": "1 + 1?"},
                                  {"role": "assistant", "content": "2"}]},
                    {"messages": [{"role": "user", "content": "2 + 2?"},
                                  {"role": "assistant", "content": "4"}]}])  # fmt: skip
    (folder / "data.jsonl").rename(folder / "train.jsonl")
    _write(folder, [{"messages": [{"role": "user", "content": "3 + 3?"},
                                  {"role": "assistant", "content": "6"}]}])  # fmt: skip
    (folder / "data.jsonl").rename(folder / "validation.jsonl")
    train = read_hub_records(str(folder), None, "train")
    assert [(r.instruction, r.output) for r in train] == [("1 + 1?", "2"), ("2 + 2?", "4")]
    assert [r.id for r in train] == ["train-1", "train-2"]
    [dev] = read_hub_records(str(folder), None, "validation")
    assert (dev.instruction, dev.output) == ("3 + 3?", "6")
    with pytest.raises(RecordError, match=r"data.hub_dataset: cannot load .*\[test\]"):
        read_hub_records(str(folder), None, "test")
    # Splits of different shapes: datasets refuses them, in one line here.
    _write(folder, [{"prompt": "3 + 3?", "completion": "6"}])
    (folder / "data.jsonl").replace(folder / "validation.jsonl")
    with pytest.raises(RecordError, match="data.hub_dataset: cannot load") as info:
        read_hub_records(str(folder), None, "validation")
    assert "\n" not in str(info.value)
