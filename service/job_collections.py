"""A collection of jobs as the REST API answers it: ``{parent}/COLLECTION`` create and list,
``{parent}/COLLECTION/ID`` get and ``:cancel``.

Every job collection (pipelineJobs, tuningJobs) keeps its records in a :class:`RecordStore` and
runs its jobs on the server's one :class:`JobRunner`; get, list (newest first, ``pageSize`` and
``pageToken``) and cancel are the same for all of them, and a subclass names the collection, its
states and its job process, and creates jobs.
"""
from __future__ import annotations

from service.http_api import ApiError, Call, Route, paginate, route
from service.jobs import JobKind, JobRunner
from service.local_paths import AllowedRoots
from service.records import RecordStore, check_parent, job_name


class JobCollection:
    """get, list and cancel over one collection's records; :meth:`create` is the subclass's."""

    collection = ""  # "pipelineJobs"
    state_prefix = ""  # "PIPELINE_STATE_"
    job_module = "service.jobs"  # what ``python -m`` runs for one job (service.jobs)
    result_fields: tuple[str, ...] = ()  # result.json fields a succeeded job's record takes
    create_query: tuple[str, ...] = ()  # the query parameters create takes

    def __init__(self, store: RecordStore, runner: JobRunner, roots: AllowedRoots):
        self.kind = JobKind(store, self.state_prefix, self.job_module, self.result_fields)
        self.store, self.runner, self.roots = store, runner, roots

    @property
    def noun(self) -> str:
        """One job of the collection, as messages name it: ``pipelineJob``."""
        return self.collection.removesuffix("s")

    def routes(self) -> list[Route]:
        jobs = "{parent}/" + self.collection
        return [route("POST", jobs, self.create, self.create_query),
                route("GET", jobs, self.list, ("pageSize", "pageToken")),
                route("GET", jobs + "/{id}", self.get),
                route("POST", jobs + "/{id}:cancel", self.cancel)]

    def create(self, call: Call) -> dict:
        raise NotImplementedError

    def job_name(self, call: Call, job_id: str) -> str:
        """The resource name of job ``job_id`` under the call's parent; ApiError 400 when a part
        is not valid."""
        try:
            return job_name(call.parent, self.collection, job_id)
        except ValueError as error:
            raise ApiError(400, str(error)) from None

    def submit(self, record: dict, files: dict[str, str]) -> dict:
        """Stores a new PENDING job with the files its folder starts with and queues it; the
        record. ApiError 409 when its name is taken."""
        if not self.store.create(record, files):
            raise ApiError(409, f"{self.noun} {record['name']} already exists; choose another "
                                f"{self.noun}Id")
        self.runner.enqueue(self.kind, record["name"])
        return record

    def _record(self, call: Call) -> dict:
        name = self.job_name(call, call.params["id"])
        record = self.store.get(name)
        if record is None:
            raise ApiError(404, f"{self.noun} {name} not found")
        return record

    def get(self, call: Call) -> dict:
        """The job."""
        return self._record(call)

    def list(self, call: Call) -> dict:
        """The jobs of the project and location, newest first."""
        try:
            check_parent(call.parent)
        except ValueError as error:
            raise ApiError(400, str(error)) from None
        return paginate(self.store.list(call.parent)[::-1], call.query, self.collection)

    def cancel(self, call: Call) -> dict:
        """Cancels a pending or running job; ``{}`` as Vertex answers."""
        record = self._record(call)
        if self.runner.cancel(self.kind, record["name"]) is None:
            raise ApiError(400, f"{self.noun} {record['name']} has already ended "
                                f"({record['state']}); only a pending or running job can be "
                                "cancelled", "FAILED_PRECONDITION")
        return {}
