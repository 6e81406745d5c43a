"""Servers whose blocks run on CUDA (``--device cuda``): every family in float32 equal to local transformers on the
CPU, sessions batched on the GPU, 16-bit compute, bitsandbytes' LLM.int8() and NF4 layers, and a real server process
on CUDA behind the real DHT.

CI has no GPU: there every test here is skipped. They run on a machine with a CUDA device (how this project ran
them: the README, Performance, On a GPU). ``COROLLA_GPU_TEST_DEVICE=cpu`` runs the device-independent ones on the
CPU, to check the tests themselves before spending GPU time."""
from __future__ import annotations

import os
import threading

import pytest
import torch

from corolla.client.config import ClientConfig
from corolla.core.blocks import BlockRange
from corolla.testing.inprocess import InProcessSwarm
from corolla.testing.tiny import TINY_CONFIGS, save_tiny_model

DEVICE = os.environ.get("COROLLA_GPU_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")
needs_cuda = pytest.mark.skipif(DEVICE != "cuda", reason="bitsandbytes' layers on CUDA need a CUDA device")

SPANS = [BlockRange(0, 2), BlockRange(2, 4), BlockRange(4, 6)]


def _ids(seed: int, length: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _server_devices(swarm) -> set[str]:
    return {str(p.device) for server in swarm.servers for p in server.stack.parameters()}


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_family_on_cuda_equals_local(family, tmp_path):
    """Three servers on the GPU in float32: greedy and beam tokens equal local transformers on the CPU, logits of a
    padded batch within 1e-4, a session in chunks equal to one pass, backward equal to local autograd."""
    local = save_tiny_model(family, tmp_path, seed=5)
    with InProcessSwarm(str(tmp_path), SPANS, dht_prefix=f"cuda-{family}", device=DEVICE) as swarm:
        assert _server_devices(swarm) == {torch.device(DEVICE).type + (":0" if DEVICE == "cuda" else "")}
        remote = swarm.client()
        try:
            ids = _ids(0, 6)
            for kwargs in (dict(do_sample=False), dict(do_sample=False, num_beams=3)):
                kwargs.update(max_new_tokens=14, pad_token_id=0)
                assert remote.generate(ids, **kwargs).tolist() == local.generate(ids, **kwargs).tolist(), kwargs

            ids = _ids(1, 19, batch=2)
            mask = torch.ones_like(ids)
            mask[1, :5] = 0
            with torch.no_grad():
                error = (remote(ids, attention_mask=mask).logits - local(ids, attention_mask=mask).logits)
            assert error[mask.bool()].abs().max().item() < 1e-4

            ids = _ids(2, 20)
            with torch.no_grad():
                expected = local(ids).logits
                outputs, position = [], 0
                with remote.inference_session(max_length=20):
                    for size in (6, 1, 9, 4):
                        outputs.append(remote(ids[:, position:position + size]).logits)
                        position += size
            assert (torch.cat(outputs, dim=1) - expected).abs().max().item() < 1e-4

            ids = _ids(3, 10, batch=2)
            remote_embeds = remote.get_input_embeddings()(ids).detach().requires_grad_(True)
            local_embeds = local.get_input_embeddings()(ids).detach().requires_grad_(True)
            weights = torch.randn(2, 10, local.config.vocab_size, generator=torch.Generator().manual_seed(4))
            (remote(inputs_embeds=remote_embeds).logits * weights).sum().backward()
            (local(inputs_embeds=local_embeds).logits * weights).sum().backward()
            error = (remote_embeds.grad - local_embeds.grad).abs().max().item()
            assert error <= 1e-4 * local_embeds.grad.abs().max().item(), error
        finally:
            remote.close()


def test_sessions_are_batched_on_cuda(tmp_path):
    """Six sessions with different prompts and lengths at once on one GPU server: steps run in batches, and each
    session's tokens equal its local ``generate()``."""
    local = save_tiny_model("llama", tmp_path, seed=9)
    with InProcessSwarm(str(tmp_path), [BlockRange(0, 6)], dht_prefix="cuda-batch", device=DEVICE) as swarm:
        clients = [swarm.client() for _ in range(6)]
        try:
            prompts = [_ids(10 + i, 3 + 2 * i) for i in range(6)]
            lengths = [5 + i for i in range(6)]
            results, errors = {}, []

            def run(index):
                try:
                    results[index] = clients[index].generate(prompts[index], max_new_tokens=lengths[index],
                                                             do_sample=False, pad_token_id=0)
                except Exception as exc:  # reported below
                    errors.append(exc)

            swarm.hold_compute(swarm.servers[0], 1.0)  # so that the sessions' first steps queue up together
            threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(300)
            assert not errors, errors
            for i in range(6):
                expected = local.generate(prompts[i], max_new_tokens=lengths[i], do_sample=False, pad_token_id=0)
                assert results[i].tolist() == expected.tolist(), i
            assert swarm.servers[0].scheduler.largest_batch >= 2
        finally:
            for client in clients:
                client.close()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_on_cuda(dtype, tmp_path):
    """A server computing in 16 bits: its logits are those of local transformers run in the same dtype on the same
    device, up to that dtype's rounding, and near the float32 model's."""
    local = save_tiny_model("llama", tmp_path, seed=11)
    half = type(local).from_pretrained(str(tmp_path), dtype=getattr(torch, dtype)).to(DEVICE).eval()
    with InProcessSwarm(str(tmp_path), SPANS[:1] + [BlockRange(2, 6)], dht_prefix=f"cuda-{dtype}", device=DEVICE,
                        dtype=dtype) as swarm:
        assert {s.stack.dtype for s in swarm.servers} == {getattr(torch, dtype)}
        remote = swarm.client()
        try:
            ids = _ids(12, 16, batch=2)
            with torch.no_grad():
                got = remote(ids).logits.float()
                same = half(ids.to(DEVICE)).logits.float().cpu()
                full = local(ids).logits
            scale = full.abs().max().item()
            assert (got - same).abs().max().item() <= 0.03 * scale, ((got - same).abs().max().item(), scale)
            assert (got - full).abs().max().item() <= 0.05 * scale, ((got - full).abs().max().item(), scale)
            tokens = remote.generate(ids[:1, :6], max_new_tokens=8, do_sample=False, pad_token_id=0)
            assert tokens.shape == (1, 14) and tokens[0, :6].tolist() == ids[0, :6].tolist()
        finally:
            remote.close()


@needs_cuda
@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_bitsandbytes_servers_on_cuda(mode, tmp_path):
    """``--quant int8`` and ``--quant nf4`` on CUDA: bitsandbytes' layers hold the weights, records announce the
    quantization, logits stay near the float model's, a session's steps equal the same swarm's one pass, and
    gradients flow through to the client."""
    bnb = pytest.importorskip("bitsandbytes")
    local = save_tiny_model("llama", tmp_path, seed=13)
    spans = [BlockRange(0, 3), BlockRange(3, 6)]
    with InProcessSwarm(str(tmp_path), spans, dht_prefix=f"cuda-{mode}", device=DEVICE, quant=mode) as swarm:
        kinds = {type(m) for s in swarm.servers for m in s.stack.modules()}
        assert (bnb.nn.Linear8bitLt if mode == "int8" else bnb.nn.Linear4bit) in kinds, kinds
        remote = swarm.client(client_config=ClientConfig(min_quant=mode))
        try:
            records = remote.swarm.run(remote.swarm.refresh())
            assert sorted(r.quant for r in records) == [mode, mode]
            ids = _ids(14, 12, batch=2)
            with torch.no_grad():
                got = remote(ids).logits
                full = local(ids).logits
                cosine = torch.nn.functional.cosine_similarity(got.flatten(), full.flatten(), dim=0).item()
                assert cosine > (0.99 if mode == "int8" else 0.9), cosine
                one_pass = remote(ids[:1]).logits
                with remote.inference_session(max_length=16):
                    steps = torch.cat([remote(ids[:1, :5]).logits] + [remote(ids[:1, i:i + 1]).logits
                                                                     for i in range(5, 12)], dim=1)
                error = (steps - one_pass).abs().max().item()
                assert error <= 2e-2 * one_pass.abs().max().item(), error
            # the same model with each linear layer's weights replaced by what the servers' layers hold: the
            # swarm's logits and gradients are this model's, up to LLM.int8()'s 8-bit activations (int8); NF4
            # computes in float32 with its dequantized weights (nf4)
            held = _with_servers_weights(local, swarm.servers, bnb)
            with torch.no_grad():
                reference = held(ids).logits
            bound = 5e-2 if mode == "int8" else 1e-3
            assert (got - reference).abs().max().item() <= bound * reference.abs().max().item()
            embeds = remote.get_input_embeddings()(ids).detach().requires_grad_(True)
            remote(inputs_embeds=embeds).logits.square().mean().backward()
            held_embeds = held.get_input_embeddings()(ids).detach().requires_grad_(True)
            held(inputs_embeds=held_embeds).logits.square().mean().backward()
            assert torch.isfinite(embeds.grad).all()
            if mode == "nf4":
                error = (embeds.grad - held_embeds.grad).abs().max().item()
                assert error <= 1e-3 * held_embeds.grad.abs().max().item(), error
            else:
                cosine = torch.nn.functional.cosine_similarity(embeds.grad.flatten(), held_embeds.grad.flatten(), dim=0)
                assert cosine.item() > 0.98, cosine.item()
            tokens = remote.generate(ids[:1, :6], max_new_tokens=8, do_sample=False, pad_token_id=0)
            assert tokens.shape == (1, 14)
        finally:
            remote.close()


def test_server_process_on_cuda(tmp_path):
    """``corolla serve --device cuda`` as a real process behind the real DHT (hivemind, loopback), with its
    throughput measured on the device: a client's greedy tokens equal local transformers'."""
    from corolla import AutoDistributedModelForCausalLM
    from corolla.testing.local_swarm import LocalSwarm

    local = save_tiny_model("llama", tmp_path / "model", seed=15)
    with LocalSwarm(model=str(tmp_path / "model"), spans=[BlockRange(0, 3), BlockRange(3, 6)], device=DEVICE,
                    dht_prefix="cuda-process") as swarm:
        remote = AutoDistributedModelForCausalLM.from_pretrained(str(tmp_path / "model"),
                                                                 initial_peers=swarm.initial_peers,
                                                                 dht_prefix="cuda-process")
        try:
            ids = _ids(16, 7)
            expected = local.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
            assert remote.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0).tolist() == expected.tolist()
            records = remote.swarm.run(remote.swarm.refresh())
            assert len(records) == 2 and all(r.throughput > 0 for r in records)
        finally:
            remote.close()


@pytest.mark.parametrize("codec", ["float16", "bfloat16", "int8-block64"])
def test_wire_codecs_with_cuda_servers(codec, tmp_path):
    """Compressed activations between GPU servers (relayed server to server): a session's logits stay within the
    codec's rounding of the exact ones, and beam search runs through the relay with the cache reordered."""
    local = save_tiny_model("llama", tmp_path, seed=17)
    with InProcessSwarm(str(tmp_path), SPANS, dht_prefix=f"cuda-{codec}", device=DEVICE) as swarm:
        remote = swarm.client(client_config=ClientConfig(wire_codec=codec))
        try:
            ids = _ids(18, 12)
            with torch.no_grad():
                expected = local(ids).logits
                with remote.inference_session(max_length=16):
                    got = torch.cat([remote(ids[:, :6]).logits] + [remote(ids[:, i:i + 1]).logits
                                                                  for i in range(6, 12)], dim=1)
            scale = expected.abs().max().item()
            assert (got - expected).abs().max().item() <= 0.05 * scale, ((got - expected).abs().max().item(), scale)
            beams = remote.generate(ids[:, :6], max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)
            assert beams.shape == (1, 12) and beams[0, :6].tolist() == ids[0, :6].tolist()
        finally:
            remote.close()


def _with_servers_weights(local, servers, bnb):
    """A copy of ``local`` (float32, CPU) whose linear layers hold the servers' quantized weights, dequantized."""
    import copy

    held = copy.deepcopy(local)
    layers = held.model.layers
    for server in servers:
        for offset, layer in enumerate(server.stack.layers):
            for name, module in layer.named_modules():
                if isinstance(module, bnb.nn.Linear4bit):
                    weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
                elif isinstance(module, bnb.nn.Linear8bitLt):
                    # the row scales move from the weights to the layer's state at its first forward
                    scales = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
                    weight = module.weight.data.float() * scales.float()[:, None] / 127
                else:
                    continue
                target = layers[server.stack.blocks.start + offset].get_submodule(name)
                with torch.no_grad():
                    target.weight.copy_(weight.float().cpu())
    return held.eval()
