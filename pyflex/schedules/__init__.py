"""Layer schedules: which layers train at each step (IST, LIFT). They act only on layer handles."""
from .base import LayerSchedule
from .ist import ImportanceSchedule
from .lift import LiftSchedule, lift_sequence

__all__ = ["ImportanceSchedule", "LayerSchedule", "LiftSchedule", "lift_sequence"]
