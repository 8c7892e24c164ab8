"""The classic PyTorch CIFAR-10 tutorial pipeline on an image folder: the baseline of train_speed.py.

ImageFolder + ToTensor + Normalize + DataLoader(batch 4, shuffle, 2 workers), the tutorial's
network, CrossEntropyLoss, SGD(lr=0.001, momentum=0.9), N epochs, then accuracy on val/.
Prints one JSON line: {"accuracy": ..., "epochs": ..., "train_s": ..., "images_per_s": ...}.
    python benchmarks/tutorial_pipeline.py DATA_DIR [--epochs 1]
Images that are not 32x32 are resized to 32x32 first (the tutorial's network needs that size); the
held-out folder is DATA_DIR/val, else valid/, validation/ or test/.
"""

import argparse
import json
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as transforms


class Net(nn.Module):  # the tutorial's network, as the tutorial writes it
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("data")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    steps = [transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))]
    first = torchvision.datasets.ImageFolder(f"{args.data}/train")[0][0]
    if first.size != (32, 32):  # not in the tutorial (CIFAR-10 is 32x32): its network needs 32x32 inputs
        steps.insert(0, transforms.Resize((32, 32)))
    transform = transforms.Compose(steps)
    held = next(n for n in ("val", "valid", "validation", "test") if os.path.isdir(f"{args.data}/{n}"))
    trainset = torchvision.datasets.ImageFolder(f"{args.data}/train", transform=transform)
    testset = torchvision.datasets.ImageFolder(f"{args.data}/{held}", transform=transform)
    trainloader = torch.utils.data.DataLoader(trainset, batch_size=4, shuffle=True, num_workers=2)
    testloader = torch.utils.data.DataLoader(testset, batch_size=4, shuffle=False, num_workers=2)
    net = Net(len(trainset.classes))
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.001, momentum=0.9)
    start = time.perf_counter()
    for _ in range(args.epochs):
        for inputs, labels in trainloader:
            optimizer.zero_grad()
            loss = criterion(net(inputs), labels)
            loss.backward()
            optimizer.step()
    train_s = time.perf_counter() - start
    correct = total = 0
    with torch.no_grad():
        for images, labels in testloader:
            correct += (net(images).argmax(1) == labels).sum().item()
            total += labels.size(0)
    print(json.dumps({"accuracy": correct / total, "epochs": args.epochs, "train_s": round(train_s, 2),
                      "images_per_s": round(args.epochs * len(trainset) / train_s, 1)}))


if __name__ == "__main__":
    main()
