"""Run on every node of an emulated cluster (torchrun): per mode, the bytes the engine accounted
and the bytes this machine's NIC sent over the same steps; rank 0 writes both, summed over nodes,
to the JSON file named by argv[1].  Not a test module itself (see test_cluster.py)."""

import json
import os
import sys


def main(out: str) -> None:
    import torch
    import torch.distributed as tdist
    import torch.nn.functional as F

    import resist_det
    from resist_det.models import preact_resnet
    from resist_det.train.world import nic_tx_bytes

    result = {}
    for mode in ("resist", "local_sgd", "ddp"):
        net = preact_resnet(layers=[1, 1, 7, 1], num_classes=3, stem="cifar", base_width=16, seed=0)
        cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 0.0,
               "optimizer": {"type": "SGD", "params": {"lr": 0.05, "momentum": 0.9}},
               "resist": {"mode": mode, "local_steps": 3, "min_blocks": 2}}
        engine, *_ = resist_det.initialize(model=net, config=cfg)
        gen = torch.Generator().manual_seed(tdist.get_rank())
        tdist.barrier()
        tx0, accounted0 = nic_tx_bytes(), engine.bytes_sent
        for _ in range(6):
            x, y = torch.randn(4, 3, 8, 8, generator=gen), torch.randint(0, 3, (4,), generator=gen)
            engine.backward(F.cross_entropy(engine(x), y))
            engine.step()
        tdist.barrier()  # every message has been received, hence has left its sender's NIC
        t = torch.tensor([float(nic_tx_bytes() - tx0), float(engine.bytes_sent - accounted0)], dtype=torch.float64)
        tdist.all_reduce(t)
        result[mode] = {"wire": t[0].item(), "accounted": t[1].item(), "rounds": engine.round}
    if tdist.get_rank() == 0:
        with open(out + ".tmp", "w") as f:
            json.dump(result, f)
        os.replace(out + ".tmp", out)


if __name__ == "__main__":
    main(sys.argv[1])
