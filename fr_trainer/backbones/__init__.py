"""fr_trainer.backbones"""
