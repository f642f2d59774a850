"""The autoencoder command's config: its own trainer defaults, replaced by a chosen trainer group."""
from selfflow_robot.cli import compose


def test_trainer_group_choice_wins():
    chosen = compose("autoencoder", ["trainer=cpu_tiny"]).trainer
    assert chosen == compose("pretrain", ["trainer=cpu_tiny"]).trainer  # cpu_tiny's values, untouched
    assert (chosen.steps, chosen.batch_size, chosen.device) == (20, 8, "cpu")


def test_default_trainer_is_the_autoencoders():
    t = compose("autoencoder").trainer
    assert (t.steps, t.batch_size, t.lr, t.warmup_steps, t.ema_decay, t.checkpoint_every) == (2000, 32, 2e-4, 100, 0.999, 1000)
    assert t.device == compose("pretrain").trainer.device == "auto"  # the rest from trainer/default.yaml
