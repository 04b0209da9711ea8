"""Layer schedules: which layers train at each step (IST, LIFT). They act only on layer handles."""
from .base import LayerSchedule
from .ist import ImportanceBatches, ImportanceSchedule
from .lift import LiftSchedule, lift_sequence

__all__ = ["ImportanceBatches", "ImportanceSchedule", "LayerSchedule", "LiftSchedule", "lift_sequence"]
