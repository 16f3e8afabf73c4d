"""What int8 weights do to a converted model's outputs: every Dense kernel in int8 with one
float32 scale per output channel (`jaxaudio.layers.quant`, what `optim.frozen_storage=
"part=int8"` stores), the model run in float32 with the checkpoint's weights and with the
int8 ones on the same random token ids, and the outputs compared.

    python -m launch.convert --source=path/to/llama --output=converted/llama
    python -m launch.quant_error --checkpoint=converted/llama [--length=32] [--seed=0] [--batch=4] \
        [--others=bfloat16] [--json=quant_error.json]

LLaMA (`Llama`): max |delta| and relative RMS error of the logits, top-1 next-token agreement
over the positions and the mean KL(fp32 || int8) of the next-token distributions. BERT
(`Bert`): max |delta| and relative RMS error of the last hidden state. Both: the share of
the parameters that went to int8. `--others=bfloat16` also rounds the other parameters
(embeddings, norms, biases) to bf16, as `frozen_storage=int8` stores them. Other models are
refused. The logic is `jaxaudio.eval.quant_error`.
"""
import sys

from absl import app, flags

from launch.common import emit_report, parse_flags, setup_jax

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A converted LLaMA or BERT checkpoint (launch.convert).")
_LENGTH = flags.DEFINE_integer("length", 32, "Tokens per sequence.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random token ids.")
_BATCH = flags.DEFINE_integer("batch", 4, "Sequences.")
_OTHERS = flags.DEFINE_enum("others", "float32", ["float32", "bfloat16"],
                            "The parameters that are not Dense kernels: kept float32, or bf16 as frozen_storage=int8 "
                            "stores them.")
_JSON = flags.DEFINE_string("json", None, "Also write the report here.")
flags.mark_flags_as_required(["checkpoint"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    setup_jax(False)
    from jaxaudio.convert import ConversionError
    from jaxaudio.eval.quant_error import QuantErrorInputError, format_report, measure_checkpoint
    try:
        report = measure_checkpoint(_CHECKPOINT.value, length=_LENGTH.value, seed=_SEED.value, batch=_BATCH.value,
                                    others=_OTHERS.value)
    except (QuantErrorInputError, ConversionError) as e:
        sys.stderr.write(f"{e}\n")
        sys.exit(2)
    emit_report(format_report(report), report, _JSON.value)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
