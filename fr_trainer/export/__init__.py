"""fr_trainer.export"""
