"""Path patching written as nnsight 0.8.1 programs (the IOI paper's three steps), run as a script
in a subprocess by tests/test_circuits_nnsight.py: `python nnsight_circuits.py <model folder>`
prints a JSON object {edge: logit difference after patching it}.

The bundled IOI model is a GPT-2: heads' outputs are `attn.c_proj`'s input, queries, keys and
values `attn.c_attn`'s output (columns [q | k | v], each [head 0 | head 1 | ...]).
"""
import json
import sys

import torch

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
EDGES = ["a0.h3->a2.h2<q>", "a1.h0->a3.h1<k>", "input->a0.h3<v>", "m0->a2.h1<q>", "a0.h3->m0", "m1->m2",
         "a2.h2->logits", "m2->logits"]


def main(folder):
    from nnsight import LanguageModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    model = LanguageModel(hf, tokenizer=tok)
    answer, wrong = tok(" Mary")["input_ids"][0], tok(" John")["input_ids"][0]
    n_layers, n_heads = hf.config.n_layer, hf.config.n_head
    d = hf.config.n_embd // n_heads
    blocks = model.transformer.h

    def values(prompt):
        out = {"z": [], "mlp": [], "emb": []}
        with torch.no_grad(), model.trace(prompt):
            out["emb"].append(blocks[0].input.save())
            for i in range(n_layers):
                out["z"].append(blocks[i].attn.c_proj.input.save())
                out["mlp"].append(blocks[i].mlp.output.save())
        return out

    clean, corrupt = values(CLEAN), values(CORRUPT)

    def receiver_value(layer, kind, head, which, recorded=None):
        """Read (recorded None) or set a receiver's input inside a trace, in forward order."""
        if kind == "a":
            cols = slice(which * n_heads * d + head * d, which * n_heads * d + (head + 1) * d)
            if recorded is None:
                return blocks[layer].attn.c_attn.output[..., cols].save()
            y = blocks[layer].attn.c_attn.output.clone()
            y[..., cols] = recorded
            blocks[layer].attn.c_attn.output = y
        elif kind == "m":
            if recorded is None:
                return blocks[layer].ln_2.input.save()
            blocks[layer].ln_2.input = recorded
        else:
            if recorded is None:
                return model.transformer.ln_f.input.save()
            model.transformer.ln_f.input = recorded

    def path_patch(edge):
        sender, receiver = edge.split("->")
        if receiver == "logits":
            r = (n_layers, "logits", None, None)
        elif receiver.startswith("m"):
            r = (int(receiver[1:]), "m", None, None)
        else:
            node, which = receiver[:-1].split("<")
            layer, head = (int(x) for x in node[1:].split(".h"))
            r = (layer, "a", head, "qkv".index(which))
        rec = []
        # Step 2: clean run, every head's z and every MLP output frozen at clean, the sender's at
        # corrupt; the receiver's input recorded.
        with torch.no_grad(), model.trace(CLEAN):
            if sender == "input":
                blocks[0].input = corrupt["emb"][0]
            for i in range(n_layers):
                if r[0] == i and r[1] == "a":
                    rec.append(receiver_value(*r))
                z = clean["z"][i].clone()
                if sender.startswith("a") and int(sender[1:].split(".")[0]) == i:
                    h = int(sender.split(".h")[1])
                    z[..., h * d:(h + 1) * d] = corrupt["z"][i][..., h * d:(h + 1) * d]
                blocks[i].attn.c_proj.input = z
                if r[0] == i and r[1] == "m":
                    rec.append(receiver_value(*r))
                blocks[i].mlp.output = (corrupt if sender == f"m{i}" else clean)["mlp"][i]
            if r[1] == "logits":
                rec.append(receiver_value(*r))
        # Step 3: clean run with the receiver's input set to what step 2 recorded.
        out = []
        with torch.no_grad(), model.trace(CLEAN):
            receiver_value(*r, recorded=rec[0])
            out.append(model.lm_head.output[0, -1].save())
        return float(out[0][answer] - out[0][wrong])

    print(json.dumps({edge: path_patch(edge) for edge in EDGES}))


if __name__ == "__main__":
    main(sys.argv[1])
