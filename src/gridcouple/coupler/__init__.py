"""The steering side: :class:`Coupler` allocates application servers and tears them down."""

from gridcouple.coupler.session import (
    ApplicationError,
    ApplicationFailedError,
    ApplicationStartError,
    ApplicationUnreachableError,
    AppRequest,
    Coupler,
)

__all__ = ["AppRequest", "ApplicationError", "ApplicationFailedError", "ApplicationStartError",
           "ApplicationUnreachableError", "Coupler"]
