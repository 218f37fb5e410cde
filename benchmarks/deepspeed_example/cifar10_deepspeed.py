"""A DeepSpeed user's training script, in the shape of DeepSpeedExamples' training/cifar/cifar10_deepspeed.py.

What an existing DeepSpeed project looks like: argparse with DeepSpeed's config arguments, a
DeepSpeed config written in the script (Adam with DeepSpeed's WarmupLR schedule), or the
older form with ``--deepspeed --deepspeed_config ds.json``; ``deepspeed.initialize(args,
model, model_parameters, training_data, config)`` builds the engine and the data loader; the
loop is ``engine(x)`` / ``engine.backward(loss)`` / ``engine.step()``.  Only the data and model
differ from the example: Fashion-MNIST padded to 3x32x32 (the example's CNN has no residual
blocks) and torchvision's stock ResNet50.  ``bench_deepspeed_example.py`` derives the ResIST
version from this file by changing two lines and compares the two.

    torchrun --nproc_per_node 2 cifar10_deepspeed.py --images 4096
"""

import argparse
import json
import time

import deepspeed
import torch
import torch.nn as nn
import torchvision
from torch.utils.data import Dataset, Subset

from resist_det.data import build_classification_dataset


def get_args():
    parser = argparse.ArgumentParser(description="Fashion-MNIST in the CIFAR example's shape")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--images", type=int, default=4096, help="training images used (the first N)")
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1138)
    parser.add_argument("--local_rank", type=int, default=-1)
    parser = deepspeed.add_config_arguments(parser)
    return parser.parse_args()


class ThreeChannels(Dataset):
    """Fashion-MNIST images (1x32x32 after padding) as the 3-channel images the example expects."""

    def __init__(self, split, limit):
        ds, _ = build_classification_dataset("fashion_mnist", None, split, pad_to_32=True, augment=False)
        self.ds = Subset(ds, range(min(limit, len(ds))))

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        x, y = self.ds[i]
        return x.expand(3, -1, -1), y


def get_ds_config(args):
    return {
        "train_batch_size": 32,  # over all ranks
        "steps_per_print": 2000,
        "optimizer": {"type": "Adam", "params": {"lr": 0.001, "betas": [0.8, 0.999], "eps": 1e-8,
                                                 "weight_decay": 3e-7, "torch_adam": True}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 0.001, "warmup_num_steps": 100}},
        "gradient_clipping": 1.0,
    }


def test(model_engine, testset):
    """Accuracy on the test set, evaluated through the engine (DeepSpeed's example does the same)."""
    model_engine.eval()
    correct = 0
    with torch.no_grad():
        for inputs, labels in torch.utils.data.DataLoader(testset, batch_size=250):
            correct += (model_engine(inputs).argmax(1) == labels).sum().item()
    model_engine.train()
    return correct / len(testset)


def main():
    args = get_args()
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(args.seed)
    trainset = ThreeChannels("train", args.images)
    testset = ThreeChannels("test", args.test_images)
    net = torchvision.models.resnet50(num_classes=10)
    parameters = filter(lambda p: p.requires_grad, net.parameters())

    if args.deepspeed_config:  # the older form: --deepspeed --deepspeed_config ds.json
        model_engine, optimizer, trainloader, __ = deepspeed.initialize(args=args, model=net, model_parameters=parameters, training_data=trainset)
    else:  # the current form: the config lives in the script
        model_engine, optimizer, trainloader, __ = deepspeed.initialize(args=args, model=net, model_parameters=parameters, training_data=trainset, config=get_ds_config(args))

    criterion = nn.CrossEntropyLoss()
    start, losses = time.perf_counter(), []
    for epoch in range(args.epochs):
        for inputs, labels in trainloader:
            outputs = model_engine(inputs)
            loss = criterion(outputs, labels)
            model_engine.backward(loss)
            model_engine.step()
            losses.append(loss.item())
    wall = time.perf_counter() - start

    accuracy = test(model_engine, testset)  # every rank evaluates, as DeepSpeed's example does
    if torch.distributed.get_rank() == 0:
        print("RESULT " + json.dumps({"accuracy": accuracy, "steps": model_engine.global_steps, "wall": wall,
                                      "first_loss": losses[0], "last_loss": sum(losses[-10:]) / 10}), flush=True)

if __name__ == "__main__":
    main()
