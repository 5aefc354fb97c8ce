"""``weak-coupling``: MuPIF's Example01 with each application as a server in its own job.

Application 1 computes a concentration equal to the time; application 2 keeps the running
average of the concentrations it is given. Each step is as long as the smaller of the two
critical time steps (0.1 and 1.0), until the target time 1.0 is reached exactly; every step
prints ``Time / concentration / running average``. The final average is 0.55.
"""

from __future__ import annotations

from rich.console import Console

from gridcouple.appkit.application import Application
from gridcouple.appkit.data import Property, TimeStep
from gridcouple.config import Config
from gridcouple.coupler import AppRequest, Coupler
from gridcouple.recipes.stepping import step_progress, time_steps

TARGET_TIME = 1.0


class Concentration(Application):
    """Application 1: a concentration equal to the time."""

    def __init__(self) -> None:
        self.value = 0.0

    def solve_step(self, tstep: TimeStep) -> None:
        self.value = 1.0 * tstep.time

    def get_property(self, property_id: str, time: float | None = None) -> Property:
        return Property(self.value, property_id="concentration", units="kg/m**3", time=time)

    def get_critical_time_step(self) -> float:
        return 0.1


class RunningAverage(Application):
    """Application 2: the running average of the concentrations it was given."""

    def __init__(self) -> None:
        self.value = 0.0
        self.count = 0
        self.contribution = 0.0

    def set_property(self, prop: Property) -> None:
        self.contribution = float(prop.value)

    def solve_step(self, tstep: TimeStep) -> None:
        self.value = (self.value * self.count + self.contribution) / (self.count + 1)
        self.count += 1

    def get_property(self, property_id: str, time: float | None = None) -> Property:
        return Property(self.value, property_id="cumulative concentration", units="kg/m**3",
                        time=time)

    def get_critical_time_step(self) -> float:
        return 1.0


def main(config: Config, console: Console, *, verbose: bool = False) -> None:
    """Run the scenario through the configured backend, printing one line per step
    (``verbose``: with the dask scheduler's INFO lines)."""
    with Coupler(config, verbose=verbose) as coupler:
        console.print(f"starting two application servers on the {config.backend} backend")
        app1, app2 = coupler.allocate_many([
            AppRequest(f"{__name__}:Concentration", name="concentration"),
            AppRequest(f"{__name__}:RunningAverage", name="running-average")])

        def critical() -> float:
            return min(app1.get_critical_time_step(), app2.get_critical_time_step())

        with step_progress(console, "weak coupling", TARGET_TIME) as advance:
            for tstep in time_steps(critical, TARGET_TIME):
                app1.solve_step(tstep)
                concentration = app1.get_property("concentration", tstep.time)
                app2.set_property(concentration)
                app2.solve_step(tstep)
                average = app2.get_property("cumulative concentration", tstep.time)
                console.print(f"Time: {tstep.time:5.2f} concentration {concentration.value:5.2f}"
                              f", running average {average.value:5.2f}")
                advance(tstep)
