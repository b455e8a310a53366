"""A check shared by the prefill tests: each row of a prefilled cache continues its prompt."""

import torch
from transformers import DynamicCache


def assert_rows_continue_their_prompts(model, tokenizer, prompts, kv, mask, logits):
    """The logits after each prompt, and after one more token through the cache rows ``kv``
    (every layer's keys and values), equal those of the prompt encoded alone (left-padded
    holes masked out)."""
    assert mask.sum(-1).tolist() == [len(p) for p in prompts]
    nxt = torch.tensor([[tokenizer.encode("x")[0]]] * len(prompts))
    with torch.no_grad():
        step = model(
            input_ids=nxt,
            attention_mask=torch.cat([mask, torch.ones_like(mask[:, :1])], 1),
            position_ids=mask.sum(-1, keepdim=True),
            cache=DynamicCache(ddp_cache_data=list(zip(*kv, strict=True)), config=model.config),
            use_cache=True,
        ).logits[:, -1]
        for i, prompt in enumerate(prompts):
            alone = model(torch.cat([prompt, nxt[i]])[None]).logits[0]
            torch.testing.assert_close(logits[i], alone[-2], atol=1e-4, rtol=0)
            torch.testing.assert_close(step[i], alone[-1], atol=1e-4, rtol=0)
