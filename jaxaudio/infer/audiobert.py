"""Filling a sentence's [MASK] with a trained AudioBERT: the whole pipeline on one sentence.

detector spans (`eval.detector`, a detector run) -> each span + " sound" through CLAP's text
tower -> the nearest clip of the index (`retrieval.*`) -> AST -> injected at the span ->
BERT's prediction at the [MASK]s (animal: the best word piece of the whole vocabulary at
each [MASK]; pitch: "lower" or "higher"). With no span detected (and the default gate),
the sentence goes through plain BERT: no adapters, nothing injected.
"""
from typing import Any

import numpy as np

from jaxaudio.infer import InferError


def run(config, workdir: str, text: str) -> dict[str, Any]:
    """`{"spans", "clips": [(span, path, score)], "prediction", "filled"}` for `text`."""
    import jax.numpy as jnp

    from jaxaudio.data.auditorybench import AuditoryBenchError, AuditoryItem, ClozeEncoder, retrieval_queries
    from jaxaudio.tasks.audiobert import AudioBertTask, ClozeSource, Example, Retriever
    from jaxaudio.tasks.audiobert_detector import SpanDetectorTask
    from jaxaudio.train.loop import load_run_variables
    if config.get("task") != "audiobert":
        raise InferError(f"--config is a {config.get('task')!r} config; --text needs an AudioBERT config")
    text = (text or "").strip()
    if "[MASK]" not in text.replace("[mask]", "[MASK]"):
        raise InferError(f"--text has no [MASK] to fill: {text!r}")
    with config.unlocked():
        config.init.bert, config.init.ast, config.init.checkpoint = "", "", ""
    try:
        task = AudioBertTask(config)
        tokenizer = task.tokenizer
        variables = load_run_variables(workdir)
        detector_dir = config.eval.get("detector", "")
        spans: list[str] = []
        if detector_dir:
            spans = SpanDetectorTask(config).detect(load_run_variables(detector_dir)["params"], [text])[0]
        retriever = Retriever(config.retrieval, task.workdir_cache)
        queries = retrieval_queries(config.data.task, spans)
        retriever.resolve(set(queries))
        item = AuditoryItem(task=config.data.task, sentence=text, answer="x", spans=spans)
        frozen = task.model.freeze_ast and not config.data.text_only
        if frozen:
            task.set_ast_parameters(variables)
        source = ClozeSource([Example(item, spans, 1)], ClozeEncoder(tokenizer, config.data.max_len), retriever,
                             task.slots, task.ast_kw, bool(config.data.text_only), task.model.gate,
                             vectors=task.ast_vector_of if frozen else None, vector_width=task.ast_width)
        example = source[0]
    except (AuditoryBenchError, OSError, ValueError) as e:
        raise InferError(str(e).splitlines()[0]) from None
    batch = {k: jnp.asarray(v)[None] for k, v in example.items()}
    logits = task._logits(variables["params"], {k: v for k, v in variables.items() if k != "params"}, batch,
                          False)[0]
    masks = np.flatnonzero(np.asarray(example["input_ids"]) == tokenizer.mask_token_id)
    if config.data.task == "pitch":
        lower, higher = tokenizer.convert_tokens_to_ids(["lower", "higher"])
        words = ["lower" if logits[m, lower] >= logits[m, higher] else "higher" for m in masks]
    else:
        words = tokenizer.convert_ids_to_tokens([int(jnp.argmax(logits[m])) for m in masks])
    prediction = tokenizer.convert_tokens_to_string(words).strip()
    clips = [(s, *retriever.table[q]) for s, q in zip(spans, queries)]
    return {"spans": spans, "clips": clips, "prediction": prediction,
            "filled": text.replace("[MASK]", prediction, 1)}


def format_result(result: dict[str, Any]) -> str:
    lines = [f"detected spans: {', '.join(result['spans']) or '(none: plain BERT, no audio)'}"]
    lines += [f"  {span!r} -> {path}  (CLAP score {score:.3f})" for span, path, score in result["clips"]]
    lines.append(f"answer: {result['prediction']}")
    lines.append(f"filled: {result['filled']}")
    return "\n".join(lines)
