"""`python tests/float64.py train CONFIG ...`: toolkit's command line with the model trained in float64.

For tests that compare two runs which are equal in exact arithmetic but round differently in float32
(1 process with batch B against N processes with batch B/N): the same sample's logits differ by a few
1e-8 between the two (matrix products blocked differently for another batch size and thread count),
and a ReLU whose input falls inside that band of zero passes the gradient in one run and blocks it in
the other. In float64 the band is about 1e-16. The model is built as usual (same initial draws), then
converted; a forward pre-hook converts its input. Released weights are saved as fp32 as always.
"""

import sys

import toolkit.train.pretrained as pretrained
from toolkit.cli import main

real_build = pretrained.build  # the loop builds every model through it


def build(*args, **kwargs):
    model = real_build(*args, **kwargs).double()
    model.register_forward_pre_hook(lambda module, inputs: tuple(x.double() for x in inputs))
    return model


pretrained.build = build
main(sys.argv[1:])
