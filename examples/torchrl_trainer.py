"""Trainer without a collector: publishes the policy to the bus after every optimiser step.

Run it next to `torchrl_collector.py` (on any number of other hosts):
    REDISBUS_URL=redis://bus-host:6379/0 python torchrl_trainer.py
"""

import os
import time

import torch
from tensordict.nn import TensorDictModule
from torch import nn

from redisbus.torchrl import RedisWeightSyncScheme

url = os.environ.get("REDISBUS_URL", "redis://127.0.0.1:6379/0")
namespace = os.environ.get("REDISBUS_NAMESPACE", "ppo-run-7")

policy = TensorDictModule(nn.Linear(7, 7), in_keys=["observation"], out_keys=["action"])
optim = torch.optim.SGD(policy.parameters(), lr=0.1)

scheme = RedisWeightSyncScheme(url, namespace=namespace)
scheme.init_on_sender(model=policy)
scheme.connect()  # publishes the initial weights
print(f"published version {scheme.last_version}", flush=True)
try:
    for step in range(5):
        loss = policy.module.weight.square().sum()  # stand-in for your loss on the collected data
        optim.zero_grad()
        loss.backward()
        optim.step()
        version = scheme.send()  # one new version; collectors apply it before their next batch
        print(f"step {step}: published version {version}", flush=True)
        time.sleep(0.2)  # stand-in for the rest of a training step
finally:
    scheme.shutdown()
