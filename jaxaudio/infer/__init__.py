"""Answering with a trained or converted audio-language model (`launch/infer.py` is the
command line): `bat` for binaural questions, `salmonn` for prompts about any audio."""


class InferError(Exception):
    """A bad input; reported as one line."""


def load_model(task, workdir: str | None, checkpoint: str | None, load_converted):
    """`(module, variables)` of a training run's latest checkpoint (`workdir`, checked
    against the config's model) or of a converted checkpoint (`load_converted(path)`)."""
    import flax.linen as nn
    import jax

    from jaxaudio.convert.engine import ConversionError, flatten, unflatten
    from jaxaudio.layers.scan import relayout
    if checkpoint:
        try:
            return load_converted(checkpoint)
        except (ConversionError, OSError, ValueError) as e:
            raise InferError(f"--checkpoint={checkpoint}: {str(e).splitlines()[0]}") from None
    from jaxaudio.train.loop import load_run_variables
    try:
        variables = load_run_variables(workdir)
    except (ValueError, OSError) as e:
        raise InferError(f"--workdir={workdir}: {str(e).splitlines()[0]}") from None
    want = {k: tuple(v.shape) for k, v in flatten(nn.unbox(jax.eval_shape(
        task.init_variables, jax.random.PRNGKey(0)))).items()}
    flat = relayout(flatten(variables), want)  # a run saved with the other layer layout
    variables = unflatten(flat)
    have = {k: tuple(v.shape) for k, v in flat.items()}
    if want != have:
        differ = sorted(set(want.items()) ^ set(have.items()))
        raise InferError(f"--workdir={workdir} does not hold this config's {task.config.task.upper()} model ({len(differ)} "
                         f"variables differ, e.g. {differ[0][0]}); is it a run of another model or size?")
    return task.model, variables
