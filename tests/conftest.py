"""Test-wide settings.

Tests run with one intra-op thread: the suite is many small models, and two processes each
spinning two OpenMP threads on a two-core machine (pytest beside a torchrun child, say) slow
each other down tenfold.
"""

import torch

torch.set_num_threads(1)
