"""The padded decode path of the CUDA graphs, run eagerly on CPU: same tokens as the unpadded forward.

On CUDA the same buffers are captured and replayed; padding rows (seq_len 0, slot -1) must write
nothing and change no real row's output, which is what this checks.
"""

from __future__ import annotations


from hf_paged import ContinuousGenerator, SamplingParams
from hf_paged.engine.cuda_graphs import DecodeGraphs
from models import make_model


def test_padded_decode_buckets_match_eager():
    model = make_model("llama")
    prompts = [[5, 6, 7], list(range(3, 40)), [9] * 17, list(range(10, 15))]
    params = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    reference = ContinuousGenerator(model, progress=False).generate(prompts, params)

    gen = ContinuousGenerator(model, progress=False, profile=True)
    # Buckets of 1, 2, 8: batches of 3 and 4 rows are padded with side-effect-free rows.
    gen.runner.graphs = DecodeGraphs(gen.runner.forward, gen.pool, max_blocks_per_seq=8, max_batch=8, buckets=(1, 2, 8), capture=False)
    padded = gen.generate(prompts, params)
    assert [r.token_ids for r in padded] == [r.token_ids for r in reference]
    assert gen.pool.allocator.is_whole()
    assert 8 in gen.runner.graphs._buckets  # batches of 3-4 rows really went through the padded bucket
    assert gen.stats.profile.decode_steps > 0
    assert "schedule + launch (host)" in gen.stats.profile.render()
