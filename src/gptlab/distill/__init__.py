"""Knowledge distillation: a teacher's distributions taught to a smaller student (``gptlab distill``)."""
