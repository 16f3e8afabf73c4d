"""SALMONN trained on annotation files: frozen Whisper + BEATs, a trained window-level
Q-Former and LoRA on a frozen Vicuna (reference/salmonn_beats.md §2).

`config.model` holds the `Salmonn` parts (`whisper`, `beats`, `connector`, `llm`, `lora`
dicts, `chunk_seconds`, the freeze flags and dtypes). The three stages differ only in
their data, as the authors say: stage 1 pre-trains on ASR + captioning, stage 2 tunes on
instructions, stage 3 (activation tuning) on a few long answers that the stage-2 model
wrote with a discounted LoRA scale (`launch/infer.py --annotation=... --lora_scale=...`).
A stage starts from the previous stage's run (`config.init.checkpoint`); the first takes
converted Whisper / BEATs / Vicuna checkpoints (`config.init.{whisper,beats,llm}`).

Data: SALMONN annotation files read as they are (`data.train_json` / `data.eval_json`,
comma-separated lists) or a generated corpus (`data.generate`: espeak-ng speech and
procedural sounds, `data.salmonn_data`), filtered to the stage's tasks (`data.tasks`).
Training draws a random paraphrase of the task's prompt per example and epoch;
evaluation uses the fixed test prompt. Each example is a clip (cut at `data.max_seconds`:
30 s is the original's one Whisper window, more gives more windows) and its text:

  prefix  [BOS] + "USER: <Speech>"                       (the same for every example)
  suffix  "</Speech> {instruction}\\nASSISTANT:" + answer + "</s>", right-padded; the
          answer and EOS are the labels (cut at `data.max_txt_len` tokens, as the original)

Evaluation decodes answers (beam search, `config.eval`) inside the jitted eval step and
scores them per task (`eval.text_metrics`: WER for ASR, BLEU for translation and
captions, accuracy for classification).
"""
import json
import logging
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np

from jaxaudio.data import salmonn_data as sd

from jaxaudio.data import salmonn_corpus as sc
from jaxaudio.data.tokenizer import TextTokenizer, ensure_tokenizer
from jaxaudio.data.validate import ClipSpec, check_files, clip_check, raise_if
from jaxaudio.eval import text_metrics
from jaxaudio.models.audio_llm import IGNORE, answer_token_stats, build_sequence, left_pad, text_loss
from jaxaudio.models.beats import BEATs
from jaxaudio.models.llama import Llama
from jaxaudio.models.qformer import SalmonnConnector
from jaxaudio.models.salmonn import Salmonn, answer
from jaxaudio.models.whisper import WhisperEncoder
from jaxaudio.tasks import register
from jaxaudio.tasks.audio_llm import check_part_paths, load_tokenizer, model_kwargs, tokenizer_path
from jaxaudio.tasks.base import Batch, Task

log = logging.getLogger(__name__)

PARTS = {"whisper": WhisperEncoder, "beats": BEATs, "connector": SalmonnConnector, "llm": Llama}
SCALARS = {"chunk_seconds": 30.0, "freeze_whisper": True, "freeze_beats": True}
PRETRAINED = ("whisper", "beats", "llm")  # the parts `config.init.<part>` may fill
_HINTS = {
    "whisper": "convert it first: python -m launch.convert --source=whisper-large-v2 --output={path}",
    "beats": "convert it first: python -m launch.convert --model=beats --source=BEATs_iter3_plus_AS2M.pt --output={path}",
    "llm": "convert it first: python -m launch.convert --source=vicuna-13b-v1.1 --output={path}",
}


# What precedes the audio in every prompt: "USER: <Speech>".
PREFIX_TEXT = sd.split_prompt(sd.PROMPT_TEMPLATE.format(sd.SPEECH_PREFIX))[0]


def prefix_ids(tokenizer: TextTokenizer) -> np.ndarray:
    """`[BOS] + tokens(PREFIX_TEXT)`, tokenized apart from the rest as the original does."""
    return np.asarray([tokenizer.bos_id, *tokenizer.encode([PREFIX_TEXT])[0]], np.int32)


class PromptedText:
    """Builds an example's text from an annotation item and a prompt; tokenizes each
    distinct prompt once."""

    def __init__(self, tokenizer: TextTokenizer, prompts: sd.PromptTable, max_len: int, max_txt_len: int,
                 max_prompt_len: int):
        self.tok, self.prompts = tokenizer, prompts
        self.max_len, self.max_txt_len, self.max_prompt_len = max_len, max_txt_len, max_prompt_len
        self.prefix = prefix_ids(tokenizer)
        self._cache: dict[str, list[int]] = {}

    def after_ids(self, prompt: str, task: str) -> list[int]:
        """Token ids of the prompt's part after `<SpeechHere>` (cached per prompt)."""
        if prompt not in self._cache:
            before, after = sd.split_prompt(prompt)
            if before != PREFIX_TEXT:
                # The prefix is one array for the whole batch, as in the original.
                raise ValueError(f"a prompt of task {task!r} puts {before!r} before <SpeechHere>; every prompt "
                                 f"must start with {sd.SPEECH_PREFIX!r} (it has {prompt!r})")
            self._cache[prompt] = self.tok.encode([after])[0]
        return self._cache[prompt]

    def check_test_prompt(self, item: dict, index: int | None = None) -> None:
        """The item's test prompt fits `max_prompt_len` (and exists for its task)."""
        after = self.after_ids(self.prompt(item, None), item["task"])
        if len(after) > self.max_prompt_len:
            where = "" if index is None else f" (evaluation item {index})"
            raise ValueError(f"the test prompt of task {item['task']!r} takes {len(after)} tokens after the audio "
                             f"> config.data.max_prompt_len={self.max_prompt_len}{where}")

    def prompt(self, item: dict, rng: np.random.Generator | None) -> str:
        task, q = item["task"], item.get("Q", "")
        return self.prompts.test(task, q) if rng is None else self.prompts.train(task, rng, q)

    def target(self, item: dict) -> list[int]:
        """`text` + EOS, cut at `max_txt_len` tokens as the original's tokenizer call does."""
        return [*self.tok.encode([item["text"]])[0], self.tok.eos_id][:self.max_txt_len]

    def example(self, item: dict, rng: np.random.Generator | None, target: list[int] | None = None) -> Batch:
        """`suffix_ids`, `suffix_mask`, `labels` `[max_len]`; with `rng` None (evaluation)
        the test prompt, plus `prompt_ids`/`prompt_mask` `[max_prompt_len]` (left-padded)."""
        prompt = self.prompt(item, rng)
        after = self.after_ids(prompt, item["task"])
        target = self.target(item) if target is None else target
        # build_sequence appends the EOS; the target already ends with it unless it was cut.
        answer_ids, eos = (target[:-1], target[-1]) if target[-1] == self.tok.eos_id else (target, None)
        ids, mask, labels = build_sequence(after, answer_ids, None, self.tok.eos_id, self.max_len, self.tok.pad_id)
        end = len(after) + len(answer_ids)  # where build_sequence put the EOS
        if eos is None and end < self.max_len:  # cut at max_txt_len: no EOS, as the original
            ids[end], mask[end], labels[end] = self.tok.pad_id, 0, IGNORE
        out = {"suffix_ids": ids, "suffix_mask": mask, "labels": labels}
        if rng is None:
            self.check_test_prompt(item)
            pids, pmask = left_pad([after], self.tok.pad_id, self.max_prompt_len)
            out.update(prompt_ids=pids[0], prompt_mask=pmask[0])
        return out


class ClipSource:
    """Random-access examples: `wave [samples]` float32 (zero-padded), `length` (real
    samples), `prefix_ids [p]`, the text of `PromptedText.example` and `index`.

    Training examples take a paraphrase drawn from (seed, index) so the source alone is
    usable; `SalmonnTask.augment` redraws it every epoch."""

    def __init__(self, items: list[dict], text: PromptedText, max_seconds: float, for_eval: bool, seed: int = 0):
        self.items, self.text, self.for_eval, self.seed = items, text, for_eval, seed
        self.max_seconds = max_seconds
        self.samples = int(round(max_seconds * sd.SAMPLE_RATE))
        self.targets = [text.target(item) for item in items]
        if for_eval:  # every test prompt must fit; checked before any training step
            for i, item in enumerate(items):
                text.check_test_prompt(item, i)
        cut = sum(len(text.after_ids(text.prompt(it, None if for_eval else np.random.default_rng(0)), it["task"]))
                  + len(t) > text.max_len for it, t in zip(items[:200], self.targets[:200]))
        if cut:
            log.warning("some examples (%d of the first %d) are longer than config.data.max_len=%d and lose the "
                        "end of their answer", cut, min(200, len(items)), text.max_len)

    def __len__(self) -> int:
        return len(self.items)

    def text_of(self, i: int, rng: np.random.Generator | None) -> Batch:
        return self.text.example(self.items[i], rng, self.targets[i])

    def __getitem__(self, i: int) -> Batch:
        wave = sd.load_clip(self.items[i], max_seconds=self.max_seconds, index=i)
        padded = np.zeros(self.samples, np.float32)
        padded[:len(wave)] = wave
        rng = None if self.for_eval else np.random.default_rng((self.seed, i))
        return {"wave": padded, "length": np.int32(len(wave)), "prefix_ids": self.text.prefix,
                **self.text_of(i, rng), "index": np.int32(i)}


def _redraw_prompt(source: ClipSource):
    def fn(example: Batch, rng: np.random.Generator) -> Batch:
        return {**example, **source.text_of(int(example["index"]), rng)}
    return fn


@register("salmonn")
class SalmonnTask(Task):
    def __init__(self, config):
        super().__init__(config)
        self._tokenizer: TextTokenizer | None = None
        self._items: dict[str, list[dict]] = {}
        self._origins: dict[str, list[str]] = {}
        self._sources: dict[str, ClipSource] = {}

    def build_model(self) -> Salmonn:
        return Salmonn(**model_kwargs(self.config.model, PARTS, SCALARS))

    @property
    def stage(self) -> int:
        return int(self.config.stage)

    @property
    def samples(self) -> int:
        return int(round(self.config.data.max_seconds * sd.SAMPLE_RATE))

    def dummy_batch(self, batch_size: int) -> Batch:
        """The prefix's length depends on the tokenizer (1 before it exists; the variables
        do not depend on it)."""
        d = self.config.data
        ids = np.zeros((batch_size, d.max_len), np.int32)
        prefix = len(prefix_ids(self.tokenizer)) if os.path.exists(self.tokenizer_path) else 1
        return {"wave": np.zeros((batch_size, self.samples), np.float32),
                "length": np.full((batch_size,), self.samples, np.int32),
                "prefix_ids": np.zeros((batch_size, prefix), np.int32), "suffix_ids": ids,
                "suffix_mask": np.ones_like(ids), "labels": np.full_like(ids, IGNORE)}

    def batch_spec(self, batch_size: int, train: bool = True) -> Batch:
        batch = self.dummy_batch(batch_size)
        if not train:  # the test prompt, left-padded to max_prompt_len (`PromptedText`)
            n = self.config.data.max_prompt_len
            batch.update(prompt_ids=np.zeros((batch_size, n), np.int32), prompt_mask=np.ones((batch_size, n), np.int32),
                         index=np.zeros((batch_size,), np.int32))
        return batch

    # --- variables ---------------------------------------------------------------------------
    def pretrained_parts(self) -> dict[str, str]:
        """Converted Whisper, BEATs and LLM (`config.init.<part>`), unless a whole
        checkpoint (`config.init.checkpoint`) is given."""
        if self.config.init.get("checkpoint"):
            return {}
        return check_part_paths(self.config.init, PRETRAINED, _HINTS,
                                skip=() if self.model.beats is not None else ("beats",))

    def init_variables(self, rng: jax.Array):
        b = self.dummy_batch(1)
        return self.model.init({"params": rng}, *(jnp.asarray(b[k]) for k in (
            "wave", "length", "prefix_ids", "suffix_ids", "suffix_mask")))

    # --- objective ---------------------------------------------------------------------------
    def _logits(self, variables, batch, **kw):
        return self.model.apply(variables, batch["wave"], batch["length"], batch["prefix_ids"], batch["suffix_ids"],
                                batch["suffix_mask"], **kw)

    def loss_fn(self, params, extra, batch, rng):
        logits = self._logits({"params": params, **extra}, batch, deterministic=False, rngs={"dropout": rng})
        loss, count = text_loss(logits, batch["labels"])
        _, correct, valid = answer_token_stats(logits, batch["labels"])
        accuracy = correct.sum() / jnp.maximum(valid.sum(), 1)
        return loss, ({"token_accuracy": accuracy, "answer_tokens": count.astype(jnp.float32)}, extra)

    def eval_step(self, params, extra, batch):
        variables = {"params": params, **extra}
        nll, correct, count = answer_token_stats(self._logits(variables, batch), batch["labels"])
        e, tok = self.config.eval, self.tokenizer
        out = answer(self.model, variables, batch["wave"], batch["length"], batch["prefix_ids"], batch["prompt_ids"],
                     batch["prompt_mask"], eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                     num_beams=e.num_beams, max_new_tokens=e.max_new_tokens,
                     lora_scale=e.lora_scale if e.get("lora_scale") is not None else None)
        return {"tokens": out.tokens, "index": batch["index"], "nll": nll, "correct": correct, "count": count}

    def predictions(self, outputs: dict[str, np.ndarray]) -> list[tuple[dict, str]]:
        """`(item, decoded answer)` per evaluated example."""
        items = self._split("eval")
        return [(items[int(i)], self.tokenizer.decode(t)) for i, t in zip(outputs["index"], outputs["tokens"])]

    def eval_metrics(self, outputs: dict[str, np.ndarray]) -> dict[str, float]:
        """Per task (`text_metrics.score_by_task`: `<task>/wer`, `<task>/bleu`,
        `<task>/accuracy`, `<task>/n`), plus the teacher-forced answer loss and accuracy."""
        pairs = self.predictions(outputs)
        metrics = {k: float(v) for k, v in text_metrics.score_by_task([p[0] for p in pairs],
                                                                      [p[1] for p in pairs]).items()}
        count = max(int(outputs["count"].sum()), 1)
        metrics["loss"] = float(outputs["nll"].sum() / count)
        metrics["token_accuracy"] = float(outputs["correct"].sum() / count)
        return metrics

    def format_results(self, metrics: dict[str, float]) -> str:
        per_task = {k: v for k, v in metrics.items() if "/" in k}
        return (f"SALMONN stage {self.stage}\n{text_metrics.format_table(per_task)}\n\n"
                f"answer tokens (teacher forced): loss {metrics['loss']:.4f}, "
                f"accuracy {100 * metrics['token_accuracy']:.2f}%")

    # --- data --------------------------------------------------------------------------------
    @property
    def tokenizer_path(self) -> str:
        return tokenizer_path(self.config.data)

    @property
    def tokenizer(self) -> TextTokenizer:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.config.data, self.model.parts()[3].vocab_size, "SALMONN")
        return self._tokenizer

    def annotation_files(self, split: str) -> list[str]:
        """`data.<split>_json` (comma-separated), else the generated corpus' file."""
        d = self.config.data
        files = [f for f in str(d[f"{split}_json"]).split(",") if f]
        if not files and d.generate:
            return [sc.layout_paths(d.root)[split]]
        if not files:
            raise ValueError(f"config.data.{split}_json is required when config.data.generate is False")
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            hint = (" (stage 3 trains on answers the stage-2 model writes: see launch/infer.py --annotation)"
                    if self.stage == 3 else "")
            raise FileNotFoundError(f"config.data.{split}_json: {missing[0]} does not exist{hint}")
        return files

    def prompt_table(self) -> sd.PromptTable:
        d = self.config.data
        if d.generate and not (d.train_prompts or d.test_prompts):
            paths = sc.layout_paths(d.root)
            return sd.PromptTable.from_files(paths["train_prompt"], paths["test_prompt"])
        if not (d.train_prompts and d.test_prompts):
            raise ValueError("config.data.train_prompts and config.data.test_prompts are required (SALMONN's "
                             "prompts/train_prompt.json and prompts/test_prompt.json, or your own)")
        return sd.PromptTable.from_files(d.train_prompts, d.test_prompts)

    def stage_tasks(self, split: str) -> tuple[str, ...]:
        """The tasks a split reads (`data.tasks` / `data.eval_tasks`, comma-separated; empty:
        the generated corpus' stage tasks — stage 3 is evaluated on stage 2's — or every
        task of the files)."""
        d = self.config.data
        chosen = d.tasks if split == "train" else d.get("eval_tasks", "")
        if chosen:
            return tuple(t for t in str(chosen).split(",") if t)
        if not d.generate or (split == "train" and d.train_json):
            return ()
        return sc.STAGES[min(self.stage, 2) if split == "eval" else self.stage]

    def prepare_data(self) -> None:
        """Generate the corpus and train the tokenizer on its text, unless both exist; then
        check the data (`check_data`)."""
        self.pretrained_parts()  # fail before minutes of data generation
        if self.config.data.generate:
            self._generate()
        self.check_data()

    def check_data(self) -> None:
        """Before the first step: the training and (when it will be read) evaluation split
        have items of the chosen tasks, and every clip they use (`path`, `expand_wav`) can be
        read (`data.validate`: headers only; any channel count and rate, as `load_clip` takes)."""
        d = self.config.data
        splits = self.checked_splits(d.eval_json)
        problems = []
        for split in splits:
            items, origins = self._split(split), self._origins[split]
            if not items:
                chosen, key = self.stage_tasks(split), "tasks" if split == "train" else "eval_tasks"
                which = f" of the tasks {','.join(chosen)} (config.data.{key})" if chosen else ""
                problems.append(f"{','.join(self.annotation_files(split))}: no item{which}")
            check = clip_check(ClipSpec())
            problems += check_files((where, path, check) for where, it in zip(origins, items)
                                    for path in [it["path"], *(it.get("expand_wav") or ())])
        raise_if(problems, f"SALMONN stage {self.stage} data (config.data) that cannot train",
                 hint="" if d.generate else "Relative clip paths are resolved against config.data.audio_root, "
                                            "or the annotation file's folder when it is empty.")

    def _generate(self) -> None:
        d = self.config.data
        tasks = tuple(t for t in sc.ALL_TASKS if t in sc.available_tasks())
        paths = sc.ensure_salmonn_corpus(d.root, d.num_train, d.num_eval, d.seed, tasks=tasks,
                                         num_workers=d.num_workers or None)
        if d.tokenizer:
            return
        with open(paths["params"]) as f:
            data_params = json.load(f)

        def texts():
            table = self.prompt_table()
            for task in table.train_tasks:
                for p in table.paraphrases(task):
                    yield sd.PROMPT_TEMPLATE.format(p)
            for item in sd.read_annotations(paths["train"]):
                yield item["text"]
                yield item.get("Q", "")
        if ensure_tokenizer(self.tokenizer_path, texts, self.model.parts()[3].vocab_size, data_params):
            self._tokenizer = None

    def _split(self, split: str) -> list[dict]:
        if split not in self._items:
            d = self.config.data
            # (where, item): where names the file and index, for `check_data`'s lines.
            pairs = [(f"{f}: annotation[{i}]", it) for f in self.annotation_files(split)
                     for i, it in enumerate(sd.read_annotations(f, d.audio_root or None))]
            tasks = self.stage_tasks(split)
            if tasks:
                pairs = [(w, it) for w, it in pairs if it["task"] in tasks]
            if split == "eval" and d.eval_limit:
                pairs = pairs[:d.eval_limit]
            self._items[split] = [it for _, it in pairs]
            self._origins[split] = [w for w, _ in pairs]
        return self._items[split]

    def _source(self, split: str) -> ClipSource:
        if split not in self._sources:
            d = self.config.data
            text = PromptedText(self.tokenizer, self.prompt_table(), d.max_len, d.max_txt_len, d.max_prompt_len)
            self._sources[split] = ClipSource(self._split(split), text, d.max_seconds, split == "eval", self.config.seed)
        return self._sources[split]

    def train_source(self) -> grain.MapDataset:
        if self.config.train.get("eval_every"):
            self._source("eval")  # its files and prompts are checked now, not after hours of training
        return grain.MapDataset.source(self._source("train"))

    def eval_source(self) -> grain.MapDataset:
        return grain.MapDataset.source(self._source("eval"))

    def augment(self, ds: grain.MapDataset, seed: int) -> grain.MapDataset:
        """A fresh paraphrase of each example's prompt every epoch (seeded per index)."""
        return ds.random_map(_redraw_prompt(self._source("train")), seed=seed)

