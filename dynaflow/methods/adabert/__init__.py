"""AdaBERT (Chen et al., IJCAI 2020): a task-adaptive convolutional student found by differentiable
architecture search, and the random-search control it must beat."""

METHOD = "adabert"
RANDOM = "adabert_random"  # the control: random genotypes of the same space, retrained alike
