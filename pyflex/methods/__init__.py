"""Layer plans and schedules from the papers, acting on the layer handles of pyflex/model/registry.py only
(docs/methods.md): HLPT / H²LPT (hlpt.py + prefix.py), the schedule base (schedule.py), IST (ist.py), LIFT (lift.py)."""
