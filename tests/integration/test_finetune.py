"""Fine-tuning through three servers equals the same computation on the local model."""
from __future__ import annotations

import copy
import json
import time

import pytest
import torch
from transformers import LlamaForSequenceClassification

from corolla.core.errors import AdapterNotServedError

# two float32 computations of the embedded model's logits (~40 at most): each lies ~7e-5 from float64
# (benchmarks/bench_fastpath.py), so they may differ by ~1.5e-4; as tests/integration/test_petals_compat.py
FLOAT32_LOGITS = 3e-4
TEXTS = ["The quick brown fox jumps over the lazy dog", "Corolla trains adapters through a swarm"]


@pytest.fixture(scope="module")
def batch(tokenizer):
    tokenizer.padding_side = "left"
    return tokenizer(TEXTS, return_tensors="pt", padding=True)


def _remote(embedded_dir, swarm, **kwargs):
    from corolla import AutoDistributedModelForCausalLM

    torch.manual_seed(0)
    return AutoDistributedModelForCausalLM.from_pretrained(str(embedded_dir), initial_peers=swarm.initial_peers, **kwargs)


def _local_logits(local, input_ids, attention_mask, soft=None, deep=None, lora=None, scaling=1.0):
    """The local model with the same soft prompt, deep prompts ([blocks, 1, prefix, hidden]) and LoRA pairs
    ({"<block>.<path>": (A, B)}), written independently of Corolla's server code (hooks on transformers' layers)."""
    embeds = local.model.embed_tokens(input_ids)
    prefix = 0
    if soft is not None:
        prefix = soft.shape[0]
        embeds = torch.cat([soft.unsqueeze(0).expand(embeds.shape[0], -1, -1), embeds], 1)
        attention_mask = torch.cat([attention_mask.new_ones(embeds.shape[0], prefix), attention_mask], 1)
    handles = []
    for index, layer in enumerate(local.model.layers):
        if deep is not None:
            def add_prompt(module, args, kwargs, prompt=deep[index]):
                hidden = args[0] if args else kwargs["hidden_states"]
                hidden = torch.cat([hidden[:, : prompt.shape[1]] + prompt, hidden[:, prompt.shape[1]:]], 1)
                return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})
            handles.append(layer.register_forward_pre_hook(add_prompt, with_kwargs=True))
        for key, (a, b) in (lora or {}).items():
            block, path = key.split(".", 1)
            if int(block) == index:
                module = layer.get_submodule(path)
                handles.append(module.register_forward_hook(
                    lambda m, inp, out, a=a, b=b: out + inp[0] @ a.t() @ b.t() * scaling))
    try:
        logits = local(inputs_embeds=embeds, attention_mask=attention_mask).logits
    finally:
        for handle in handles:
            handle.remove()
    return logits[:, prefix:]


def _loss(logits, batch):
    targets = batch["input_ids"][:, 1:]
    mask = batch["attention_mask"][:, 1:].bool()
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
    return losses[mask].mean()


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def test_gradients_of_inputs_deep_prompts_and_lora_match_local(embedded_dir, llama_swarm, llama_local, batch):
    from corolla.models.lora import LoraSet

    from corolla.client.config import ClientConfig

    # One piece per request, batched like the local reference: split into rows, float32 sums run in another order
    # and this model's attention-sink positions (gradients ~1e5) amplify that to ~2e-4 (the pipelined default is
    # covered by the optimizer-step tests below).
    remote = _remote(embedded_dir, llama_swarm, tuning_mode="deep_ptune", pre_seq_len=3,
                     client_config=ClientConfig(pipeline_pieces=1))
    try:
        layers = remote.model.layers
        with torch.no_grad():
            remote.model.prompt_tuning.intermediate_prompt_embeddings.weight.normal_(std=0.05)
        embeds = remote.model.embed_tokens(batch["input_ids"]).detach()
        deep = remote.model.prompt_tuning.deep_prompts().detach()
        generator = torch.Generator().manual_seed(1)
        pairs = {
            f"{b}.self_attn.q_proj": (torch.randn(4, 576, generator=generator) * 0.02, torch.randn(576, 4, generator=generator) * 0.02)
            for b in (0, 14, 29)
        }
        # through the swarm: inputs, prompts, LoRA tensors all require grad
        x = torch.cat([torch.zeros(2, 3, 576), embeds], 1).requires_grad_(True)
        mask = torch.cat([torch.ones(2, 3, dtype=torch.long), batch["attention_mask"]], 1)
        prompts = deep.clone().requires_grad_(True)
        lora_pairs = {k: (a.clone().requires_grad_(True), b.clone().requires_grad_(True)) for k, (a, b) in pairs.items()}
        out = layers(x, mask, prompts=prompts, lora=LoraSet(2.0, lora_pairs))
        weights = torch.randn(out.shape, generator=generator)
        (out * weights).sum().backward()

        # locally, by hand
        x_local = x.detach().clone().requires_grad_(True)
        prompts_local = deep.clone().requires_grad_(True)
        local_pairs = {k: (a.clone().requires_grad_(True), b.clone().requires_grad_(True)) for k, (a, b) in pairs.items()}
        hidden = x_local
        handles = []
        for index, layer in enumerate(llama_local.model.layers):
            for key, (a, b) in local_pairs.items():
                if int(key.split(".")[0]) == index:
                    handles.append(layer.self_attn.q_proj.register_forward_hook(
                        lambda m, inp, o, a=a, b=b: o + inp[0] @ a.t() @ b.t() * 2.0))
        try:
            from transformers.masking_utils import create_causal_mask

            positions = torch.arange(x.shape[1]).unsqueeze(0)
            causal = create_causal_mask(config=llama_local.config, inputs_embeds=hidden, attention_mask=mask, cache=None,
                                        position_ids=positions)
            rotary = llama_local.model.rotary_emb(hidden, positions)
            for index, layer in enumerate(llama_local.model.layers):
                hidden = torch.cat([hidden[:, :3] + prompts_local[index], hidden[:, 3:]], 1)
                hidden = layer(hidden, attention_mask=causal, position_embeddings=rotary, position_ids=positions)
        finally:
            for handle in handles:
                handle.remove()
        (hidden * weights).sum().backward()

        assert _rel(out.detach(), hidden.detach()) < 1e-4
        assert _rel(x.grad, x_local.grad) < 1e-4
        assert _rel(prompts.grad, prompts_local.grad) < 1e-4
        for key in pairs:
            assert _rel(lora_pairs[key][0].grad, local_pairs[key][0].grad) < 1e-4, key
            assert _rel(lora_pairs[key][1].grad, local_pairs[key][1].grad) < 1e-4, key
    finally:
        remote.close()


@pytest.mark.parametrize("mode", ["ptune", "deep_ptune", "lora"])
def test_optimizer_steps_match_local(mode, embedded_dir, llama_swarm, llama_local, batch):
    kwargs = {"lora": dict(tuning_mode="lora", lora_rank=4, lora_alpha=8)}.get(mode, dict(tuning_mode=mode, pre_seq_len=4))
    remote = _remote(embedded_dir, llama_swarm, **kwargs)
    try:
        trainable = [p for p in remote.parameters() if p.requires_grad]
        assert trainable and all(not p.requires_grad for p in remote.lm_head.parameters())
        local_params = [p.detach().clone().requires_grad_(True) for p in trainable]
        names = [n for n, p in remote.named_parameters() if p.requires_grad]
        # eps 1e-6: Adam turns any gradient far above eps into a step of ~lr, so gradients that are float noise
        # (LoRA A while B is still zero, distant prompt entries) would otherwise become full steps of random sign
        remote_opt = torch.optim.Adam(trainable, lr=2e-3, eps=1e-6)
        local_opt = torch.optim.Adam(local_params, lr=2e-3, eps=1e-6)
        losses = []
        for _ in range(3):
            remote_opt.zero_grad()
            loss = _loss(remote(**batch).logits, batch)
            loss.backward()
            remote_opt.step()
            losses.append(loss.item())

            local_opt.zero_grad()
            by_name = dict(zip(names, local_params))
            soft = by_name.get("model.prompt_tuning.prompt_embeddings.weight")
            deep = None
            if "model.prompt_tuning.intermediate_prompt_embeddings.weight" in by_name:
                weight = by_name["model.prompt_tuning.intermediate_prompt_embeddings.weight"]
                deep = weight.view(weight.shape[0], 30, 576).permute(1, 0, 2).unsqueeze(1)
            lora = None
            if mode == "lora":
                lora = {}
                for name, param in by_name.items():
                    if ".lora_A." in name:
                        key = name.split(".lora_A.")[1]
                        block, path = key.split("__", 1)
                        lora[f"{block}.{path.replace('__', '.')}"] = (param, by_name[name.replace(".lora_A.", ".lora_B.")])
            local_loss = _loss(_local_logits(llama_local, batch["input_ids"], batch["attention_mask"], soft, deep, lora,
                                             scaling=2.0), batch)
            local_loss.backward()
            local_opt.step()
            assert abs(local_loss.item() - loss.item()) < 1e-4 * max(1.0, abs(loss.item()))
        assert losses[-1] < losses[0], losses
        for name, remote_param, local_param in zip(names, trainable, local_params):
            # within 5% of one Adam step (lr 2e-3): pieces of the batch sum in another order than the local pass
            assert torch.allclose(remote_param, local_param, atol=1e-4, rtol=1e-4), name
    finally:
        remote.close()


def test_lora_saves_in_peft_format_and_generates_with_it(embedded_dir, llama_swarm, llama_local, batch, tmp_path):
    import peft

    remote = _remote(embedded_dir, llama_swarm, tuning_mode="lora", lora_rank=4, lora_alpha=8)
    try:
        with torch.no_grad():
            for param in remote.model.remote_lora.lora_B.values():
                param.normal_(std=0.02)
        remote.save_lora(tmp_path / "adapter")
        local = peft.PeftModel.from_pretrained(copy.deepcopy(llama_local), tmp_path / "adapter").eval()
        with torch.no_grad():
            expected = local(**batch).logits
            got = remote(**batch).logits
        real = batch["attention_mask"].bool()  # padding positions' logits are not outputs anyone uses
        assert (got[real] - expected[real]).abs().max().item() < FLOAT32_LOGITS
        ids = batch["input_ids"][1:, -6:]
        with torch.no_grad():
            local_tokens = local.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
        assert remote.generate(ids, max_new_tokens=8, do_sample=False).tolist() == local_tokens.tolist()

        # loaded into weights of another alpha and more targets (trained): the adapter's scaling, its targets only
        targets = ("q_proj", "self_attn.v_proj", "down_proj")  # short names as PEFT takes them
        other = _remote(embedded_dir, llama_swarm, tuning_mode="lora", lora_rank=4, lora_alpha=16,
                        lora_target_modules=targets)
        try:
            with torch.no_grad():
                for param in other.model.remote_lora.lora_B.values():
                    param.normal_(std=0.02)
            other.load_lora(tmp_path / "adapter")
            with torch.no_grad():
                assert (other(**batch).logits[real] - got[real]).abs().max().item() < 1e-5
            other.save_lora(tmp_path / "again")
            again = peft.PeftModel.from_pretrained(copy.deepcopy(llama_local), tmp_path / "again").eval()
            with torch.no_grad():
                assert (again(**batch).logits[real] - expected[real]).abs().max().item() < 1e-5
        finally:
            other.close()
    finally:
        remote.close()


def test_sequence_classification_head(embedded_dir, llama_swarm, llama_local, batch):
    from corolla import AutoDistributedModelForSequenceClassification

    torch.manual_seed(0)
    remote = AutoDistributedModelForSequenceClassification.from_pretrained(
        str(embedded_dir), initial_peers=llama_swarm.initial_peers, num_labels=3, tuning_mode="ptune", pre_seq_len=2
    )
    try:
        assert [n for n, p in remote.named_parameters() if p.requires_grad] == [
            "model.prompt_tuning.prompt_embeddings.weight", "score.weight"]
        local = LlamaForSequenceClassification(copy.deepcopy(remote.config)).eval()
        local.model.load_state_dict(llama_local.model.state_dict())
        local.score.load_state_dict(remote.score.state_dict())
        with torch.no_grad():
            soft = remote.model.prompt_tuning.prompt_embeddings.weight
            hidden = _local_logits_hidden(local, batch, soft)
            expected = local.score(hidden)[:, -1]  # left padding: the last position is the last token
            got = remote(**batch).logits
        assert got.shape == (2, 3)
        assert (got - expected).abs().max().item() < 1e-4
        labels = torch.tensor([0, 2])
        optimizer = torch.optim.Adam([p for p in remote.parameters() if p.requires_grad], lr=3e-2)
        losses = []
        for _ in range(4):
            optimizer.zero_grad()
            loss = remote(**batch, labels=labels).loss
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0], losses
    finally:
        remote.close()


def test_a_classifier_saves_its_head_with_its_lora(embedded_dir, llama_swarm, llama_local, batch, tmp_path):
    """``save_lora`` of a sequence classifier writes PEFT's SEQ_CLS adapter, the trained head in it as a module to
    save: PEFT loads it onto a local classifier with the same logits, and ``load_lora`` into a new one as well."""
    import peft

    from corolla import AutoDistributedModelForSequenceClassification

    def classifier():
        return AutoDistributedModelForSequenceClassification.from_pretrained(
            str(embedded_dir), initial_peers=llama_swarm.initial_peers, num_labels=3, tuning_mode="lora",
            lora_rank=4, lora_alpha=8)

    torch.manual_seed(0)
    remote = classifier()
    try:
        with torch.no_grad():
            for param in remote.model.remote_lora.lora_B.values():
                param.normal_(std=0.02)
            remote.score.weight.normal_(std=0.05)
            got = remote(**batch).logits
        remote.save_lora(tmp_path / "classifier")
        config = json.loads((tmp_path / "classifier" / "adapter_config.json").read_text())
        assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
        local = LlamaForSequenceClassification(copy.deepcopy(remote.config)).eval()
        local.model.load_state_dict(llama_local.model.state_dict())
        local = peft.PeftModel.from_pretrained(local, tmp_path / "classifier").eval()
        with torch.no_grad():
            assert (local(**batch).logits - got).abs().max().item() < 1e-4
        again = classifier()
        try:
            again.load_lora(tmp_path / "classifier")
            with torch.no_grad():
                assert (again(**batch).logits - got).abs().max().item() < 1e-5
        finally:
            again.close()
    finally:
        remote.close()


def _local_logits_hidden(local_cls, batch, soft):
    embeds = local_cls.model.embed_tokens(batch["input_ids"])
    embeds = torch.cat([soft.unsqueeze(0).expand(embeds.shape[0], -1, -1), embeds], 1)
    mask = torch.cat([batch["attention_mask"].new_ones(embeds.shape[0], soft.shape[0]), batch["attention_mask"]], 1)
    return local_cls.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state[:, soft.shape[0]:]


@pytest.fixture(scope="module")
def adapter_swarm(tiny_llama_dir, tmp_path_factory):
    """Two servers of the tiny Llama that also load a PEFT LoRA adapter (random, non-zero) with --adapters."""
    import peft
    from transformers import LlamaForCausalLM

    from corolla.testing.local_swarm import LocalSwarm
    from corolla.core.blocks import BlockRange

    torch.manual_seed(3)
    base = LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    peft_model = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    adapter_dir = tmp_path_factory.mktemp("tiny-adapter")
    peft_model.save_pretrained(adapter_dir)
    local = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_llama_dir), adapter_dir).eval()
    # a plain server of every block (the fastest chain: one hop), and two that hold the adapter
    with LocalSwarm(model=str(tiny_llama_dir), spans=[BlockRange(0, 4)], dht_prefix="adapted") as swarm:
        for span in (BlockRange(0, 2), BlockRange(2, 4)):
            swarm.start_server(span, extra_args=["--adapters", str(adapter_dir)])
        yield swarm, str(adapter_dir), local


def test_served_adapter_equals_local_peft(adapter_swarm, tiny_llama_dir):
    from corolla import AutoDistributedModelForCausalLM

    swarm, adapter, local = adapter_swarm
    ids = torch.tensor([[5, 9, 17, 33, 2, 70], [8, 8, 19, 4, 91, 23]])
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(tiny_llama_dir), initial_peers=swarm.initial_peers, dht_prefix="adapted", active_adapter=adapter)
    plain = AutoDistributedModelForCausalLM.from_pretrained(
        str(tiny_llama_dir), initial_peers=swarm.initial_peers, dht_prefix="adapted")
    try:
        with torch.no_grad():
            expected = local(ids).logits
            got = model(ids).logits
            without = plain(ids).logits
        assert (got - expected).abs().max().item() < 1e-4
        assert (without - expected).abs().max().item() > 1e-3  # the adapter really changes the outputs
        local_tokens = local.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
        assert model.generate(ids, max_new_tokens=8, do_sample=False).tolist() == local_tokens.tolist()
        with model.inference_session(max_length=16):  # sessions are routed to the servers holding it too
            assert model.generate(ids, max_new_tokens=8, do_sample=False).tolist() == local_tokens.tolist()

        # Petals' way: the adapter named in the model's config
        plain.config.active_adapter = adapter
        with torch.no_grad():
            assert (plain(ids).logits - expected).abs().max().item() < 1e-4
        assert plain.generate(ids, max_new_tokens=8, do_sample=False).tolist() == local_tokens.tolist()
        plain.config.active_adapter = "no-such-adapter"
        started = time.monotonic()
        with pytest.raises(ValueError, match="holds adapter 'no-such-adapter'") as refused:
            plain(ids)
        assert isinstance(refused.value, AdapterNotServedError) and adapter in str(refused.value)
        assert time.monotonic() - started < 5.0  # told at once, not after waiting for blocks
        plain.config.active_adapter = None
        with torch.no_grad():
            assert (plain(ids).logits - without).abs().max().item() < 1e-5
    finally:
        model.close()
        plain.close()


def test_bad_tuning_requests_get_clear_errors(adapter_swarm, tiny_llama_dir):
    from corolla.client.rpc import call
    from corolla.client.swarm import RemoteSwarm, hivemind_client
    from corolla.client.config import ClientConfig
    from corolla.core.blocks import BlockRange
    from corolla.core.errors import RemoteError
    from corolla.wire.messages import BackwardRequest, ForwardRequest

    swarm, adapter, _ = adapter_swarm
    config = ClientConfig(initial_peers=tuple(swarm.initial_peers))
    client = RemoteSwarm(config, "adapted", 4, hivemind_client(config))
    try:
        record, span = client.run(client.plan_inference(BlockRange(0, 2), adapter))[0]
        hidden = torch.randn(1, 3, 64)

        def ask(request):
            return client.run(call(client.transport, record, request, 30))

        def rejected(request, *words):
            with pytest.raises(RemoteError) as info:
                ask(request)
            for word in words:
                assert word in str(info.value), str(info.value)
            assert ask(ForwardRequest(span, hidden)).hidden_states.shape == (1, 3, 64)  # still serving

        rejected(BackwardRequest(span, hidden, torch.randn(1, 2, 64)), "grad_outputs has shape [1, 2, 64]")
        rejected(ForwardRequest(span, hidden, lora={"0.self_attn.q_proj.lora_A": torch.randn(4, 64),
                                                    "0.self_attn.q_proj.lora_B": torch.randn(64, 3)}), "same rank")
        rejected(ForwardRequest(span, hidden, lora={"1.self_attn.nope.lora_A": torch.randn(4, 64),
                                                    "1.self_attn.nope.lora_B": torch.randn(64, 4)}),
                 "no linear layer 'self_attn.nope'", "self_attn.q_proj")
        rejected(ForwardRequest(span, hidden, lora={"3.self_attn.q_proj.lora_A": torch.randn(4, 64),
                                                    "3.self_attn.q_proj.lora_B": torch.randn(64, 4)}),
                 "block 3 sent with a request for blocks 0:2")
        rejected(ForwardRequest(span, hidden, active_adapter="no-such-adapter"), "unknown adapter 'no-such-adapter'",
                 adapter)
        rejected(ForwardRequest(span, hidden, prompts=torch.randn(5, 1, 2, 64)), "prompts must be [2 blocks")
    finally:
        client.close()


def test_example_script_trains_and_saves(llama_swarm, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "examples" / "finetune_lora.py"
    result = subprocess.run(
        [sys.executable, str(script), "--initial-peers", *llama_swarm.initial_peers, "--steps", "4",
         "--output", str(tmp_path / "adapter")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    first, last = map(float, result.stdout.split("loss: ")[1].split("\n")[0].split(" -> "))
    assert last < first
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert result.stdout.count("  after:  ") == 3


def test_servers_keep_activations_for_backward(embedded_dir, llama_swarm, batch):
    from corolla.client.rpc import call
    from corolla.wire.messages import InfoRequest

    remote = _remote(embedded_dir, llama_swarm, tuning_mode="ptune", pre_seq_len=2)
    try:
        swarm = remote.swarm
        records = swarm.run(swarm.records())

        def kept() -> int:
            return sum(swarm.run(call(swarm.transport, r, InfoRequest(), 30)).activations_kept for r in records)

        # an earlier test of this swarm may have left a pass without its backward (kept until activation_ttl_s):
        # such leftovers can only disappear meanwhile, so each count is bounded by the one before
        before = kept()
        with torch.no_grad():
            remote(**batch)
        idle = kept()
        assert idle <= before  # nothing to differentiate: nothing kept
        loss = _loss(remote(**batch).logits, batch)
        held = kept()
        assert held >= 3  # every server of the chain kept this pass's activations (one per piece)
        loss.backward()
        assert kept() <= min(idle, held - 3)  # the backward pass used them all, none recomputed or left behind
        assert remote.model.prompt_tuning.prompt_embeddings.weight.grad.abs().sum() > 0
    finally:
        remote.close()


@pytest.mark.parametrize("mode", ["ptune", "deep_ptune"])
def test_generate_with_trained_prompts_equals_local(mode, embedded_dir, llama_swarm, llama_local, tokenizer):
    remote = _remote(embedded_dir, llama_swarm, tuning_mode=mode, pre_seq_len=3)
    try:
        tuning = remote.model.prompt_tuning
        with torch.no_grad():
            tuning.prompt_embeddings.weight.normal_(std=0.5)
            if tuning.intermediate_prompt_embeddings is not None:
                tuning.intermediate_prompt_embeddings.weight.normal_(std=0.5)
        ids = tokenizer("The weather today is", return_tensors="pt")["input_ids"]
        got = remote.generate(ids, max_new_tokens=10, do_sample=False)
        # locally: greedy decoding by hand with the same soft prompt and deep prompts, no cache
        soft, deep = tuning.prompt_embeddings.weight.detach(), tuning.deep_prompts()
        deep = None if deep is None else deep.detach()
        tokens = ids
        with torch.no_grad():
            for _ in range(10):
                logits = _local_logits(llama_local, tokens, torch.ones_like(tokens), soft, deep)
                tokens = torch.cat([tokens, logits[:, -1:].argmax(-1)], 1)
        assert got.tolist() == tokens.tolist()
    finally:
        remote.close()


@pytest.mark.parametrize("mode", ["deep_ptune", "lora"])
def test_trainable_weights_stay_float32_in_a_half_precision_model(mode, embedded_dir, llama_swarm, batch):
    """As Petals keeps its prompts: in a bfloat16 model the prompts and LoRA weights are float32 (bfloat16 rounds
    away steps this small), and under Petals' names for the prompts; a step trains every one of them."""
    kwargs = dict(tuning_mode="lora", lora_rank=4, lora_alpha=8) if mode == "lora" else dict(tuning_mode=mode,
                                                                                             pre_seq_len=4)
    remote = _remote(embedded_dir, llama_swarm, torch_dtype=torch.bfloat16, **kwargs)
    try:
        assert remote.model.embed_tokens.weight.dtype == torch.bfloat16
        trainable = dict((n, p) for n, p in remote.named_parameters() if p.requires_grad)
        assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
        if mode != "lora":
            tuning = remote.model.prompt_tuning
            assert remote.transformer.prompt_embeddings is tuning.prompt_embeddings
            assert remote.model.intermediate_prompt_embeddings is tuning.intermediate_prompt_embeddings
            with torch.no_grad():
                tuning.intermediate_prompt_embeddings.weight.normal_(std=0.02)
        else:
            with torch.no_grad():
                for param in remote.model.remote_lora.lora_B.values():
                    param.normal_(std=0.02)
        before = {n: p.detach().clone() for n, p in trainable.items()}
        optimizer = torch.optim.Adam(trainable.values(), lr=1e-4)
        loss = _loss(remote(**batch).logits.float(), batch)
        loss.backward()
        optimizer.step()
        for name, param in trainable.items():
            moved = (param.detach() != before[name]).float().mean().item()
            assert moved > 0.99, (name, moved)
    finally:
        remote.close()
