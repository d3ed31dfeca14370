"""The finetuning recipe (models/finetune.py trains with it). Nothing here imports torch: `tta finetune` builds its
flags from these fields, and `tta --help` or a refused flag must not wait for torch."""

from pydantic import BaseModel, ConfigDict, Field


class Recipe(BaseModel):
    """How to finetune; every field is a `tta finetune` flag, and the whole recipe goes into the card."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(5, ge=1, description="passes over the training images (the warm start's head-only ones too)")
    lr: float = Field(
        0.01,
        gt=0,
        description="learning rate of the backbone (and of the head unless --head-lr): small, so that the "
        "pretrained features move little; it decays to 0 on a cosine over all the steps",
    )
    head_lr: float | None = Field(
        None,
        gt=0,
        description="the head's own learning rate (per-group rates): a new or re-initialised head starts from "
        "nothing and can take a rate ~10x the backbone's; unset: --lr",
    )
    weight_decay: float = Field(
        5e-4,
        ge=0,
        description="L2 penalty on every trained parameter (SGD's weight_decay); 0 turns it off, e.g. for a few "
        "epochs on a small set where the pull towards 0 only forgets the pretrained weights",
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (Nesterov)")
    batch_size: int = Field(64, ge=1, description="images per step; an epoch drops the last incomplete batch")
    freeze_stages: int = Field(
        0,
        ge=0,
        description="keep the first K stages fixed (see models.finetune.stages: the stem, then each block "
        "group; resnet20_cifar_a has stem, layer1, layer2, layer3): early layers hold generic features that "
        "transfer, and fewer trained parameters overfit a small set less; their BatchNorm statistics stay too",
    )
    freeze: list[str] = Field(
        default_factory=list,
        description="keep the parameters whose names start with these prefixes fixed, comma-separated "
        "(e.g. conv1,bn1,layer1): freezing by name, for architectures whose stages are not the top-level blocks",
    )
    reinit_head: bool = Field(
        False,
        description="re-initialise the head (weights N(0, 0.02), bias 0); with data of another number of "
        "classes the head is replaced by one of the right size: a head trained for other classes is no start",
    )
    head_epochs: int = Field(
        0,
        ge=0,
        description="warm start: train only the head for the first K epochs (the backbone fixed, its BatchNorm "
        "statistics too), then everything not frozen: a random head's large first gradients would otherwise "
        "wreck the pretrained features before it has learnt anything",
    )
    augment: bool = Field(True, description="random crop (4 px zero padding) and horizontal flip of each image")
    seed: int = Field(0, description="seed of the shuffling, the augmentation and the validation split")
