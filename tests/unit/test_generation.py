"""Generation and evaluation on tiny random models with the two toy tokenizers (no hub)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from tokenizers import processors
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from cot2align_ds.data.records import Record
from cot2align_ds.data.synthetic import ArithmeticTaskSpec, make_split
from cot2align_ds.eval.evaluate import (
    EvalInputError,
    evaluate_records,
    write_eval_results,
    write_predictions,
)
from cot2align_ds.inference.generation import (
    DecodingConfig,
    GenerationSettingsError,
    encode_prompts,
    end_token_ids,
    generate,
    generate_ids,
)
from cot2align_ds.inference.loading import ModelLoadError, load_model_for_eval
from cot2align_ds.models.toy_tokenizers import train_byte_bpe, train_unigram

GREEDY = DecodingConfig(max_new_tokens=10, greedy=True, no_repeat_ngram_size=0)
SAMPLING = DecodingConfig(max_new_tokens=10, greedy=False, no_repeat_ngram_size=0)
PROMPTS = [
    "Mia has 3 apples.",
    "Tom has 12 pens. First Tom buys 3 more pens. Then Tom loses 2 pens. How many pens?",
    "Ava finds 4 coins. How many?",
]


@pytest.fixture(scope="module")
def records() -> list[Record]:
    return make_split(40, ArithmeticTaskSpec(num_steps=2), seed=0, prefix="gen")


@pytest.fixture(scope="module")
def pairs(records) -> dict[str, tuple]:
    """name -> (model, tokenizer): GPT-2 + byte-level BPE, Llama + Unigram (pad != EOS)."""
    corpus = [f"{r.instruction} {r.input} {r.rationale} {r.output}" for r in records]
    bpe, unigram = train_byte_bpe(corpus, 300), train_unigram(corpus, 200)
    torch.manual_seed(0)
    gpt2 = GPT2Config(
        vocab_size=len(bpe), n_positions=256, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=bpe.bos_token_id, eos_token_id=bpe.eos_token_id,
    )  # fmt: skip
    llama = LlamaConfig(
        vocab_size=len(unigram), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
        bos_token_id=unigram.bos_token_id, eos_token_id=unigram.eos_token_id,
        pad_token_id=unigram.pad_token_id,
    )  # fmt: skip
    return {
        "gpt2-bpe": (AutoModelForCausalLM.from_config(gpt2).eval(), bpe),
        "llama-unigram": (AutoModelForCausalLM.from_config(llama).eval(), unigram),
    }


@pytest.mark.parametrize("pair", ["gpt2-bpe", "llama-unigram"])
def test_batched_greedy_equals_each_prompt_alone(pairs, pair: str) -> None:
    # Left padding + attention mask must make padding invisible: each prompt's greedy output in a
    # mixed-length batch (sorted internally, order restored) equals its output alone.
    model, tokenizer = pairs[pair]
    alone = [generate_ids(model, tokenizer, [prompt], GREEDY)[0] for prompt in PROMPTS]
    batched = generate_ids(model, tokenizer, PROMPTS, GREEDY, batch_size=3)
    assert batched == alone
    assert all(0 < len(ids) <= GREEDY.max_new_tokens for ids in batched)
    assert tokenizer.padding_side == "right"  # the caller's tokenizer was not switched


def test_generation_stops_before_the_first_eos(pairs) -> None:
    # Make a token the random model really emits the EOS: generation must end right before its
    # first occurrence, also in a batch where the other row keeps going (pad != EOS here).
    model, tokenizer = pairs["llama-unigram"]
    free_run = generate_ids(model, tokenizer, [PROMPTS[0]], GREEDY)[0]
    stop_id = free_run[-1]
    assert free_run.index(stop_id) > 0, "pick a prompt whose free run does not start with it"
    stopping = copy.deepcopy(tokenizer)
    stopping.eos_token = tokenizer.convert_ids_to_tokens(stop_id)
    assert stopping.eos_token_id == stop_id
    cut = generate_ids(model, stopping, [PROMPTS[0], PROMPTS[1]], GREEDY, batch_size=2)[0]
    assert cut == free_run[: free_run.index(stop_id)]


def test_generation_also_stops_at_the_models_own_end_tokens(pairs) -> None:
    # A chat model ends its turn with a token its generation_config lists beside the tokenizer's
    # EOS (Gemma-3's <end_of_turn>, Llama-3's <|eot_id|>): generation ends before that one too.
    model, tokenizer = pairs["llama-unigram"]
    free_run = generate_ids(model, tokenizer, [PROMPTS[0]], GREEDY)[0]
    stop_id = free_run[-1]
    assert stop_id != tokenizer.eos_token_id and free_run.index(stop_id) > 0
    chat_model = copy.deepcopy(model)
    chat_model.generation_config.eos_token_id = [tokenizer.eos_token_id, stop_id]
    assert end_token_ids(chat_model, tokenizer) == [tokenizer.eos_token_id, stop_id]
    cut = generate_ids(chat_model, tokenizer, [PROMPTS[0], PROMPTS[1]], GREEDY, batch_size=2)[0]
    assert cut == free_run[: free_run.index(stop_id)]


def test_sampling_is_seeded_and_leaves_global_rng_alone(pairs) -> None:
    model, tokenizer = pairs["gpt2-bpe"]
    state = torch.get_rng_state()
    first = generate(model, tokenizer, PROMPTS, SAMPLING, seed=10, batch_size=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert generate(model, tokenizer, PROMPTS, SAMPLING, seed=10, batch_size=2) == first
    assert generate(model, tokenizer, PROMPTS, SAMPLING, seed=20, batch_size=2) != first


def test_no_repeat_ngram_size_is_applied(pairs) -> None:
    model, tokenizer = pairs["gpt2-bpe"]
    prompt_ids = encode_prompts(tokenizer, [PROMPTS[0]], None)[0]

    def repeated_bigram(decoding: DecodingConfig) -> bool:
        sequence = prompt_ids + generate_ids(model, tokenizer, [PROMPTS[0]], decoding)[0]
        bigrams = list(zip(sequence, sequence[1:], strict=False))
        return len(bigrams) != len(set(bigrams))

    # The random model loops on a token greedily; the constraint must break the loop.
    assert repeated_bigram(DecodingConfig(max_new_tokens=16, greedy=True, no_repeat_ngram_size=0))
    assert not repeated_bigram(
        DecodingConfig(max_new_tokens=16, greedy=True, no_repeat_ngram_size=2)
    )


def test_prompts_are_cut_from_the_left_keeping_bos(pairs) -> None:
    _, unigram = pairs["llama-unigram"]
    with_bos = copy.deepcopy(unigram)  # Llama-style: the tokenizer prepends <s>
    with_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", unigram.bos_token_id)]
    )
    full = with_bos(PROMPTS[1])["input_ids"]
    assert full[0] == unigram.bos_token_id and len(full) > 8
    assert encode_prompts(with_bos, [PROMPTS[1]], 8) == [[full[0], *full[-7:]]]
    plain = unigram(PROMPTS[1])["input_ids"]
    assert encode_prompts(unigram, [PROMPTS[1], "Mia"], 8) == [
        plain[-8:],
        unigram("Mia")["input_ids"],
    ]


def test_missing_pad_token_falls_back_without_mutating(pairs) -> None:
    model, bpe = pairs["gpt2-bpe"]
    tokenizer = copy.deepcopy(bpe)
    tokenizer.pad_token = None
    model.train()
    try:
        texts = generate(model, tokenizer, PROMPTS, GREEDY, batch_size=3)
        assert model.training, "the caller's train/eval mode is restored"
    finally:
        model.eval()
    assert tokenizer.pad_token is None and tokenizer.padding_side == "right"
    assert texts == generate(model, bpe, PROMPTS, GREEDY, batch_size=3)
    assert all(isinstance(text, str) and text == text.strip() for text in texts)


def test_too_long_for_the_model_is_one_clear_error(pairs) -> None:
    model, tokenizer = pairs["gpt2-bpe"]
    long_prompt = " ".join(["Mia has 3 apples."] * 80)
    decoding = DecodingConfig(max_new_tokens=20, greedy=True, max_prompt_tokens=250)
    with pytest.raises(GenerationSettingsError, match="exceeds the model's 256 positions") as info:
        generate(model, tokenizer, [long_prompt], decoding)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"top_p": 0.0}, "top_p must be in"),
        ({"top_k": -1}, "top_k and no_repeat_ngram_size"),
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
    ],
)
def test_decoding_config_validation(settings: dict, message: str) -> None:
    with pytest.raises(GenerationSettingsError, match=message):
        DecodingConfig(**settings)


# ------------------------------------------------------------------------------ evaluation ---


@pytest.fixture(scope="module")
def saved_model(pairs, tmp_path_factory) -> Path:
    model, tokenizer = pairs["llama-unigram"]
    path = tmp_path_factory.mktemp("saved") / "model"
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


EVAL_OPTIONS = {"template": "compact", "max_new_tokens": 6, "max_prompt_tokens": 64}


def test_evaluate_a_saved_model_end_to_end(pairs, saved_model, records, tmp_path) -> None:
    model, tokenizer = load_model_for_eval(saved_model)
    assert any(p.suffix == ".safetensors" for p in saved_model.iterdir())
    subset = records[:3]
    result = evaluate_records(
        model, tokenizer, subset, seeds=[10, 20], batch_size=2, **EVAL_OPTIONS
    )
    assert result.seeds == [10, 20] and len(result.predictions) == 6
    for name in ("rouge_l", "exact_match"):
        stats = result.scores[name]
        assert len(stats.per_seed) == 2 and 0.0 <= stats.mean <= 100.0
        per_seed = [
            sum(p.scores[name] for p in result.predictions if p.seed == seed) / 3
            for seed in (10, 20)
        ]
        assert stats.per_seed == pytest.approx(per_seed)
    # The loaded model is the saved one: same greedy predictions as the in-memory original.
    original, _ = pairs["llama-unigram"]
    loaded = evaluate_records(model, tokenizer, subset, seeds=[1], greedy=True, **EVAL_OPTIONS)
    in_memory = evaluate_records(
        original, tokenizer, subset, seeds=[1], greedy=True, **EVAL_OPTIONS
    )
    assert [p.prediction for p in loaded.predictions] == [
        p.prediction for p in in_memory.predictions
    ]

    write_predictions(tmp_path / "predictions.jsonl", result)
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    assert {"id", "seed", "prompt", "prediction", "references", "extracted_answer"} <= set(rows[0])
    assert rows[0]["references"] == [subset[0].output] and rows[0]["prompt"].startswith("Task:")
    write_eval_results(tmp_path / "eval_results.json", result)
    assert json.loads((tmp_path / "eval_results.json").read_text()) == result.summary()


def test_greedy_runs_once_whatever_the_seeds(pairs, records) -> None:
    model, tokenizer = pairs["gpt2-bpe"]
    result = evaluate_records(
        model, tokenizer, records[:2], seeds=[10, 20, 30], greedy=True, **EVAL_OPTIONS
    )
    assert result.seeds == [None] and len(result.predictions) == 2
    assert all(stats.std == 0.0 and len(stats.per_seed) == 1 for stats in result.scores.values())


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and message
    return message


def test_unknown_metric_fails_before_generating(pairs, records) -> None:
    model, tokenizer = pairs["gpt2-bpe"]
    with pytest.raises(EvalInputError, match="unknown metric 'bleu'"):
        evaluate_records(model, tokenizer, records[:1], metrics=("bleu",), **EVAL_OPTIONS)


def test_record_without_answer_is_one_clear_error(pairs, records) -> None:
    model, tokenizer = pairs["gpt2-bpe"]
    broken = [records[0], Record(id="no-answer", instruction="Say hi", output="  ")]
    with pytest.raises(EvalInputError, match="record 'no-answer' has an empty 'output'") as info:
        evaluate_records(model, tokenizer, broken, **EVAL_OPTIONS)
    _one_line(info)


def test_empty_references_are_one_clear_error(pairs, records) -> None:
    model, tokenizer = pairs["gpt2-bpe"]
    with pytest.raises(EvalInputError, match="record 'gen-1': empty references") as info:
        evaluate_records(model, tokenizer, records[:2], references=[["5"], []], **EVAL_OPTIONS)
    _one_line(info)


def test_non_model_directory_is_one_clear_error(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelLoadError) as info:
        load_model_for_eval(tmp_path)
    assert _one_line(info) == (
        f"{tmp_path} is not a model directory (no config.json); pass a saved Hugging Face model "
        "or a DeepSpeed checkpoint"
    )
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model_for_eval(tmp_path / "missing")


def test_model_without_tokenizer_is_one_clear_error(pairs, tmp_path) -> None:
    model, _ = pairs["gpt2-bpe"]
    model.save_pretrained(tmp_path / "bare")
    # transformers would silently build an empty GPT-2 tokenizer here.
    with pytest.raises(ModelLoadError, match="no tokenizer files") as info:
        load_model_for_eval(tmp_path / "bare")
    _one_line(info)


def test_tokenizer_larger_than_the_model_is_one_clear_error(pairs, saved_model) -> None:
    _, bpe = pairs["gpt2-bpe"]  # 300 tokens; the saved Llama embeds the smaller Unigram vocab
    tokenizer_dir = saved_model.parent / "bpe_tokenizer"
    bpe.save_pretrained(tokenizer_dir)
    with pytest.raises(ModelLoadError, match="tokenizer has 300 tokens but the model embeds"):
        load_model_for_eval(saved_model, tokenizer_path=tokenizer_dir)


def _bos_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<bos>": 0, "a": 1, "b": 2, "[UNK]": 3, "<eos>": 4}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", 0)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", unk_token="[UNK]"
    )


@pytest.mark.parametrize(("cut", "special", "expected"), [
    ("left", True, [0, 2, 1]),  # BOS kept in front, then the end next to the answer
    ("right", True, [0, 1, 2]),  # the reference's cut: the first tokens
    ("left", False, [2, 2, 1]),
    ("right", False, [1, 2, 2]),  # the reference: no special tokens, first 3
])  # fmt: skip
def test_prompt_cut_and_special_tokens_in_evaluation_and_training(cut, special, expected):
    from cot2align_ds.data.collator import tokenize_pair
    from cot2align_ds.inference.generation import encode_prompts

    tokenizer = _bos_tokenizer()
    prompt = "a b b a"  # with BOS: [0, 1, 2, 2, 1]
    assert encode_prompts(tokenizer, [prompt], 3, cut=cut, special_tokens=special) == [expected]
    pair = tokenize_pair(
        tokenizer, prompt, "b", max_prompt_tokens=3, max_total_tokens=6, prompt_cut=cut,
        prompt_special_tokens=special,
    )  # fmt: skip
    assert pair.input_ids == [*expected, 2, 4] and pair.prompt_length == 3


def test_max_length_caps_prompt_plus_new_tokens():
    from transformers import GenerationConfig

    from cot2align_ds.inference.generation import DecodingConfig, _batch_config

    decoding = DecodingConfig(max_new_tokens=50, max_length=40)
    config = GenerationConfig(max_new_tokens=50)
    assert _batch_config(config, decoding, [[1] * 30, [1] * 10]).max_new_tokens == 10
    assert _batch_config(config, decoding, [[1] * 45]).max_new_tokens == 1
    unlimited = DecodingConfig(max_new_tokens=50)
    assert _batch_config(config, unlimited, [[1] * 300]) is config


def test_exact_match_stage_decodes_with_the_recipes_ngram_rule(pairs, records, tmp_path):
    # A recipe whose answers repeat themselves (arithmetic rationales) turns the n-gram ban off;
    # the stage must decode as its recipe says, not with the generation default (6).
    from cot2align_ds.data.templates import standard_prompt
    from cot2align_ds.experiments.pipeline import exact_match_stage

    model, tokenizer = pairs["gpt2-bpe"]
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    prompts = [standard_prompt(record, "compact") for record in records[:2]]
    predictions = {}
    for no_repeat in (0, 2):
        base = {
            "data": {"template": "compact", "max_prompt_tokens": 128},
            "eval": {"no_repeat_ngram_size": no_repeat},
        }
        out = tmp_path / f"predictions{no_repeat}.jsonl"
        exact_match_stage(tmp_path / "model", records[:2], base, out, max_new_tokens=16)
        predictions[no_repeat] = [json.loads(line)["prediction"] for line in out.open()]
        decoding = DecodingConfig(max_new_tokens=16, greedy=True, no_repeat_ngram_size=no_repeat)
        assert predictions[no_repeat] == generate(model, tokenizer, prompts, decoding)
    # The random model loops greedily: the ban changes what it writes.
    assert predictions[0] != predictions[2]
