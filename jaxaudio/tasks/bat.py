"""BAT trained on SpatialSoundQA: a frozen Spatial-AST, a trained Q-Former projector and
LoRA on a frozen LLaMA answer spatial questions (reference/bat_spatial_ast.md §4-5).

`config.model` holds the `Bat` parts (`encoder`, `projector`, `llm`, `lora` dicts, plus
`dtype`/`param_dtype`); `config.stage` picks the curriculum stage's question types
(`data.spatial_qa.STAGES`: 1 = A+B, 2 = A-D, 3 = A-E). A stage starts from the previous
stage's run (`config.init.checkpoint` = its workdir); the first stage takes a trained
Spatial-AST as its frozen encoder (`config.init.encoder`: a Spatial-AST workdir or
converted checkpoint) and a pretrained LLM (`config.init.llm`: a converted LLaMA), and
its projector and adapters start fresh.

Data, generated (`config.data.generate`) or official, goes through the official reader
(`data.spatialsoundqa`): one generated dataset under `data.root` holds every question
type, and a stage reads its own types (the official stage folders hold exactly theirs).
The text side is a byte-level BPE trained on the generated questions and answers
(`<root>/tokenizer.json`), or the LLM's own `tokenizer.json` (`data.tokenizer`).

Evaluation decodes answers (beam or greedy, `config.eval`) inside the jitted eval step
and scores the text with `eval.spatial_qa` next to chance.
"""
import json
import logging
import os
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np

from jaxaudio.data import spatial_qa as sqa
from jaxaudio.data import spatialsoundqa as ssqa
from jaxaudio.data.tokenizer import TextTokenizer, ensure_tokenizer
from jaxaudio.data.validate import ClipSpec, check_files, raise_if, record_files
from jaxaudio.eval.spatial_qa import chance_metrics, format_table, score
from jaxaudio.generate import generate
from jaxaudio.models.audio_llm import IGNORE, answer_token_stats, build_sequence, llm_adapters, text_loss
from jaxaudio.models.bat import PROMPT, Bat
from jaxaudio.models.llama import Llama
from jaxaudio.models.qformer import BatProjector
from jaxaudio.models.spatial_ast import SpatialAST
from jaxaudio.tasks import register
from jaxaudio.tasks.audio_llm import check_part_paths, load_tokenizer, model_kwargs as system_kwargs, tokenizer_path
from jaxaudio.tasks.base import Batch, Task

log = logging.getLogger(__name__)

_PARTS = {"encoder": SpatialAST, "projector": BatProjector, "llm": Llama}
PRETRAINED = ("encoder", "llm")  # the parts `config.init.<part>` may fill
_MISSING_PART = {
    "encoder": ("BAT's frozen encoder must be a trained Spatial-AST: run its main job first (python -m launch.train "
                "--config=configs/spatial_ast_tiny.py --workdir={path}), or point config.init.encoder at a Spatial-AST "
                "workdir or converted checkpoint (empty: a random frozen encoder, for tests only)."),
    "llm": ("Convert the LLM first (python -m launch.convert --source=Llama-2-7b-hf --output={path}), or set "
            "config.init.llm= (empty: a random frozen LLM)."),
}


def model_kwargs(model_cfg) -> dict[str, Any]:
    """`config.model` -> `Bat(**kwargs)`; unknown fields of a part are named."""
    return system_kwargs(model_cfg, _PARTS)


# --- examples -------------------------------------------------------------------------------
class QASource:
    """Random-access examples of one split: binaural audio plus the tokenized text.

    Every example: `wave [2, samples]` float32 (`render_record`), `input_ids`,
    `attention_mask`, `labels [max_len]` int32 (`build_sequence`: loss on the answer and
    EOS) and `index` (the position in `items`, whose `question_id` it is). Evaluation
    examples add `prompt_ids [max_len]` (BOS + prompt, left-padded) and `prompt_len`.
    """

    def __init__(self, records: list[dict], tokenizer: TextTokenizer, max_len: int, clip_seconds: float,
                 sample_rate: int, rir_seconds: float | None, for_eval: bool):
        self.records, self.clip_seconds, self.sample_rate = records, clip_seconds, sample_rate
        self.rir_seconds, self.for_eval, self.max_len = rir_seconds, for_eval, max_len
        prompts = tokenizer.encode([PROMPT.format(question=r["question"]) for r in records])
        answers = tokenizer.encode([r["answer"] or "" for r in records])
        too_long = [r["question_id"] for r, p in zip(records, prompts) if 1 + len(p) >= max_len]
        if too_long and for_eval:
            raise ValueError(f"{len(too_long)} evaluation prompts do not fit config.data.max_len={max_len} "
                             f"(BOS + prompt + at least one answer token), e.g. question_id {too_long[0]!r}")
        cut = sum(2 + len(p) + len(a) > max_len for p, a in zip(prompts, answers))
        if cut:
            log.warning("%d of %d examples are longer than max_len=%d and lose the end of their answer",
                        cut, len(records), max_len)
        self.text = []
        for p, a in zip(prompts, answers):
            ids, mask, labels = build_sequence(p, a, tokenizer.bos_id, tokenizer.eos_id, max_len, tokenizer.pad_id)
            ex = {"input_ids": ids, "attention_mask": mask, "labels": labels}
            if for_eval:
                ex["prompt_ids"] = np.full(max_len, tokenizer.pad_id, np.int32)
                ex["prompt_ids"][max_len - 1 - len(p):] = [tokenizer.bos_id, *p]
                ex["prompt_len"] = np.int32(1 + len(p))
            self.text.append(ex)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Batch:
        wave = ssqa.render_record(self.records[i], clip_seconds=self.clip_seconds, rir_seconds=self.rir_seconds,
                                  sample_rate=self.sample_rate)
        return {"wave": wave, **self.text[i], "index": np.int32(i)}


def stage_filter(items: list[dict], stage: int) -> list[int]:
    """Indices of the items whose question type belongs to curriculum `stage`."""
    if stage not in sqa.STAGES:
        raise ValueError(f"config.stage={stage}: choose one of {sorted(sqa.STAGES)}")
    letters = sqa.STAGES[stage]
    return [i for i, item in enumerate(items) if sqa.TYPE_LETTER.get(item.get("question_type")) in letters]


def decode_answers(module: Bat, variables: dict[str, Any], wave: jax.Array, prompt_ids: jax.Array,
                   prompt_len: jax.Array, *, eos: int, pad: int, num_beams: int, max_new_tokens: int) -> jax.Array:
    """`models.bat.answer` on arrays, so it runs inside `jit`: `wave [batch, 2, samples]`,
    `prompt_ids [batch, p]` ([pad..][BOS + prompt], `prompt_len` real tokens) -> generated
    tokens `[batch, max_new_tokens]` (`pad` after EOS)."""
    audio = module.apply(variables, wave, method=Bat.encode_audio)
    text = module.apply(variables, prompt_ids, method=Bat.embed_text)
    q, p = audio.shape[1], text.shape[1]
    pads = (p - prompt_len)[:, None]
    j = jnp.arange(q + p)[None, :]
    # [audio][pad..][text] -> [pad..][audio][text], as `answer` orders the prefix.
    order = jnp.where(j < pads, q + j, jnp.where(j < pads + q, j - pads, j))
    prefix = jnp.take_along_axis(jnp.concatenate([audio.astype(text.dtype), text], axis=1), order[:, :, None], 1)
    llm_params = variables["params"]["llm"]
    config = llm_adapters(module.lora_config(), llm_params)
    return generate(module.parts()[2], llm_params, inputs_embeds=prefix, attention_mask=(j >= pads).astype(jnp.int32),
                    max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad, num_beams=num_beams,
                    lora=config).tokens


# --- the task -------------------------------------------------------------------------------
@register("bat")
class BatTask(Task):
    def __init__(self, config):
        super().__init__(config)
        self._tokenizer: TextTokenizer | None = None
        self._splits: dict[str, tuple[list[dict], list[dict]]] = {}
        self._origins: dict[str, list[str]] = {}

    def build_model(self) -> Bat:
        return Bat(**model_kwargs(self.config.model))

    @property
    def stage(self) -> int:
        return int(self.config.stage)

    @property
    def samples(self) -> int:
        return int(round(self.config.data.clip_seconds * self.model.parts()[0].sample_rate))

    def dummy_batch(self, batch_size: int) -> Batch:
        n = self.config.data.max_len
        ids = np.zeros((batch_size, n), np.int32)
        return {"wave": np.zeros((batch_size, 2, self.samples), np.float32), "input_ids": ids,
                "attention_mask": np.ones_like(ids), "labels": np.full_like(ids, IGNORE)}

    def batch_spec(self, batch_size: int, train: bool = True) -> Batch:
        batch = self.dummy_batch(batch_size)
        if not train:  # the decoding prompt, left-padded to max_len (`QASource`)
            n = self.config.data.max_len
            batch.update(prompt_ids=np.zeros((batch_size, n), np.int32), prompt_len=np.ones((batch_size,), np.int32),
                         index=np.zeros((batch_size,), np.int32))
        return batch

    # --- variables ---------------------------------------------------------------------------
    def _part_sources(self) -> dict[str, str]:
        """`config.init.{encoder,llm}` that are set, used only when no whole checkpoint
        (`config.init.checkpoint`) is loaded; a missing path is an error that says what to run."""
        if self.config.init.get("checkpoint"):
            return {}
        return check_part_paths(self.config.init, PRETRAINED, _MISSING_PART)

    def pretrained_parts(self) -> dict[str, str]:
        """The frozen encoder (`config.init.encoder`) and LLM (`config.init.llm`), loaded by
        the trainer after init; the LLM's adapters start fresh."""
        return self._part_sources()

    def init_variables(self, rng: jax.Array):
        """Fresh Bat variables (LoRA adapters included); see `pretrained_parts`."""
        b = self.dummy_batch(1)
        return self.model.init({"params": rng}, jnp.asarray(b["wave"]), jnp.asarray(b["input_ids"]))

    # --- objective ---------------------------------------------------------------------------
    def loss_fn(self, params, extra, batch, rng):
        logits = self.model.apply({"params": params, **extra}, batch["wave"], batch["input_ids"],
                                  batch["attention_mask"], deterministic=False, rngs={"dropout": rng})
        loss, count = text_loss(logits, batch["labels"])
        _, correct, valid = answer_token_stats(logits, batch["labels"])
        accuracy = correct.sum() / jnp.maximum(valid.sum(), 1)
        return loss, ({"token_accuracy": accuracy, "answer_tokens": count.astype(jnp.float32)}, extra)

    def eval_step(self, params, extra, batch):
        variables = {"params": params, **extra}
        logits = self.model.apply(variables, batch["wave"], batch["input_ids"], batch["attention_mask"])
        nll, correct, count = answer_token_stats(logits, batch["labels"])
        tok, e = self.tokenizer, self.config.eval
        tokens = decode_answers(self.model, variables, batch["wave"], batch["prompt_ids"], batch["prompt_len"],
                                eos=tok.eos_id, pad=tok.pad_id, num_beams=e.num_beams,
                                max_new_tokens=e.max_new_tokens)
        return {"tokens": tokens, "index": batch["index"], "nll": nll, "correct": correct, "count": count}

    def predictions(self, outputs: dict[str, np.ndarray]) -> list[tuple[dict, str]]:
        """`(item, answer text)` per evaluated example."""
        items = self._split("eval")[1]
        return [(items[int(i)], self.tokenizer.decode(t)) for i, t in zip(outputs["index"], outputs["tokens"])]

    def eval_metrics(self, outputs: dict[str, np.ndarray]) -> dict[str, float]:
        """`eval.spatial_qa.score` of the decoded answers (fractions), the teacher-forced
        answer-token loss and accuracy, and the chance rows: `chance_<metric>` (uniform
        guessing) and `chance_majority/<metric>` (the most frequent answer)."""
        pairs = self.predictions(outputs)
        items = [item for item, _ in pairs]
        metrics = {k: float(v) for k, v in score(items, [text for _, text in pairs]).items()}
        count = max(int(outputs["count"].sum()), 1)
        metrics["loss"] = float(outputs["nll"].sum() / count)
        metrics["token_accuracy"] = float(outputs["correct"].sum() / count)
        chance = chance_metrics(items)
        metrics.update({f"chance_{k}": float(v) for k, v in chance["uniform"].items()})
        metrics.update({f"chance_majority/{k}": float(v) for k, v in chance["majority"].items()})
        return metrics

    def format_results(self, metrics: dict[str, float]) -> str:
        """The paper-style table (percent) with the chance rows, then the counts and loss."""
        model = {k: v for k, v in metrics.items() if not k.startswith("chance_")}
        majority = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("chance_majority/")}
        uniform = {k[len("chance_"):]: v for k, v in metrics.items()
                   if k.startswith("chance_") and not k.startswith("chance_majority/")}
        table = format_table(model, {"uniform": uniform, "majority": majority}, model_name=f"BAT stage {self.stage}")
        counts = ", ".join(f"{letter}={int(model[f'{letter}/n'])}" for letter in "ABCDE" if f"{letter}/n" in model)
        unparsed = ", ".join(f"{letter}={100 * model[f'{letter}/unparsed']:.0f}%" for letter in "ABCDE"
                             if f"{letter}/unparsed" in model)
        tokens = f"loss {model['loss']:.4f}, accuracy {100 * model['token_accuracy']:.2f}%"
        return (f"{table}\n\nitems per type: {counts}; unparseable answers: {unparsed}\n"
                f"answer tokens (teacher forced): {tokens}")

    # --- data --------------------------------------------------------------------------------
    @property
    def tokenizer_path(self) -> str:
        return tokenizer_path(self.config.data)

    @property
    def tokenizer(self) -> TextTokenizer:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.config.data, self.model.parts()[2].vocab_size, "BAT")
        return self._tokenizer

    def prepare_data(self) -> None:
        """Generate the data (every question type, so one tokenizer serves all stages) and
        train the tokenizer on its training text, unless both exist with these settings;
        then check the data (`check_data`)."""
        self._part_sources()  # fail before minutes of data generation
        if self.config.data.generate:
            self._generate()
        self.check_data()

    def _generate(self) -> None:
        d = self.config.data
        paths = sqa.ensure_spatial_qa(d.root, d.num_train, d.num_eval, d.seed, clip_seconds=d.clip_seconds,
                                      stage_types=sqa.STAGES[max(sqa.STAGES)], num_workers=d.num_workers or None)
        with open(paths["params"]) as f:
            data_params = json.load(f)

        def texts():
            items = ssqa.read_qa_items(paths["train"])
            yield PROMPT.format(question="")
            for it in items:
                yield PROMPT.format(question=it["question"])
                yield it["answer"]
        ensure_tokenizer(self.tokenizer_path, texts, self.model.parts()[2].vocab_size, data_params)
        self._tokenizer = None

    def check_data(self) -> None:
        """Before the first step: the stage has questions in the training and (when it will be
        read) evaluation split, and every clip and binaural room response they use can be read
        (`data.validate`, headers only; each file once however many questions share it)."""
        d = self.config.data
        splits = self.checked_splits(d.eval_json)
        problems = []
        for split in splits:
            records, origins = self._split(split)[0], self._origins[split]
            if not records:
                files = sqa.layout_paths(d.root)[split] if d.generate else d[f"{split}_json"]
                problems.append(f"{files}: no question of stage {self.stage}'s types "
                                f"{''.join(sqa.STAGES[self.stage])} (config.stage)")
            problems += check_files((where, path, check) for where, r in zip(origins, records)
                                    for path, check in record_files(r, ClipSpec()))
        raise_if(problems, f"BAT stage {self.stage} data (config.data) that cannot train",
                 hint="" if d.generate else f"Clips are config.data.audio_root/<audio_id>{d.ext_audio}, room "
                                            "responses config.data.reverb_root/binaural/<reverb_id>.")

    def _split(self, split: str) -> tuple[list[dict], list[dict]]:
        """`(records, items)` of the stage's questions in `split` (at most `data.eval_limit`
        evaluation items when it is set): reader records and the QA items they came from."""
        if split not in self._splits:
            d = self.config.data
            if d.generate:
                paths = sqa.layout_paths(d.root)
                items = ssqa.read_qa_items(paths[split])
                files = [paths[split]] * len(items)
                records = sqa.split_records(d.root, split)
            else:
                for field in (f"{split}_json", f"{split}_reverb_json", "audio_root", "reverb_root"):
                    if not d[field]:
                        raise ValueError(f"config.data.{field} is required when config.data.generate is False")
                    missing = [f for f in str(d[field]).split(",") if f and not os.path.exists(f)]
                    if missing:
                        raise FileNotFoundError(f"config.data.{field}: {missing[0]} does not exist")
                pairs = [(f, it) for f in str(d[f"{split}_json"]).split(",") if f for it in ssqa.read_qa_items(f)]
                files, items = [f for f, _ in pairs], [it for _, it in pairs]
                records = ssqa.qa_records(items, ssqa.read_reverb_index(d[f"{split}_reverb_json"]), d.audio_root,
                                          d.reverb_root, ext_audio=d.ext_audio)
            keep = stage_filter(items, self.stage)
            if split == "eval" and d.eval_limit:
                keep = keep[:d.eval_limit]
            self._splits[split] = ([records[i] for i in keep], [items[i] for i in keep])
            # Where each kept question came from, for `check_data`'s lines.
            self._origins[split] = [f"{files[i]}: question_id {items[i].get('question_id')!r}" for i in keep]
        return self._splits[split]

    def _source(self, split: str) -> grain.MapDataset:
        d = self.config.data
        records = self._split(split)[0]
        return grain.MapDataset.source(QASource(
            records, self.tokenizer, d.max_len, d.clip_seconds, self.model.parts()[0].sample_rate,
            d.rir_seconds or None, for_eval=split == "eval"))

    def train_source(self) -> grain.MapDataset:
        return self._source("train")

    def eval_source(self) -> grain.MapDataset:
        return self._source("eval")
