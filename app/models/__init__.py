"""SQLAlchemy tables. Importing this package registers every table on Base.metadata."""

from app.models.artifact import Artifact
from app.models.dataset import Dataset
from app.models.job import Job, JobMetrics
from app.models.model import Model
from app.models.tenant import ApiKey, Tenant
from app.models.worker import Worker

__all__ = ["ApiKey", "Artifact", "Dataset", "Job", "JobMetrics", "Model", "Tenant", "Worker"]
