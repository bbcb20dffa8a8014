"""Learning signal: every MIL model learns bags whose label hangs on a few planted patches, and its
scores put those patches on top."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from mambascope.train.mil_options import MIL_MODELS
from mil_helpers import IN_DIM, planted_bags, single_thread, small_model  # noqa: F401  (autouse fixture)


def _train(model: torch.nn.Module, bags, epochs: int, lr: float = 1e-3) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for epoch in range(epochs):
        for i in np.random.default_rng(epoch).permutation(len(bags)):
            bag = bags[i]
            out = model(torch.from_numpy(bag.features), torch.from_numpy(bag.coords))
            loss = torch.nn.functional.cross_entropy(out.logits.unsqueeze(0), torch.tensor([bag.label]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


@pytest.mark.parametrize("name", MIL_MODELS)
def test_model_finds_planted_instances(name):
    train, held_out = planted_bags(160, seed=1, in_dim=IN_DIM), planted_bags(20, seed=2, in_dim=IN_DIM)
    model = small_model(name, num_classes=2, dropout=0.25)
    _train(model, train, epochs=6)
    model.eval()
    correct, instance_auc, top_hits = 0, [], []
    with torch.no_grad():
        for bag in held_out:
            out = model(torch.from_numpy(bag.features), torch.from_numpy(bag.coords))
            correct += int(out.logits.argmax().item() == bag.label)
            if bag.label:
                is_planted = np.zeros(len(bag.features))
                is_planted[bag.planted] = 1
                scores = out.scores.numpy()
                instance_auc.append(roc_auc_score(is_planted, scores))
                top_hits.append(int(np.argmax(scores)) in set(bag.planted.tolist()))
    assert correct / len(held_out) >= 0.9
    assert np.mean(instance_auc) >= 0.9  # planted patches outrank the others
    assert np.mean(top_hits) >= 0.8  # the single top-scored patch is a planted one
