"""fr_trainer.margins"""
