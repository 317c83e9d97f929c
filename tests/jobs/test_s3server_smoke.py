"""The moto S3 server of tests/s3server.py with the session's local Ray: plain s3:// URIs work in the driver, in
Ray Data's read and write tasks, and in a Ray task calling pyarrow.fs.FileSystem.from_uri (job code's style)."""
import pytest


@pytest.mark.integration
def test_ray_data_parquet_roundtrip_on_s3(s3_server, ray_local):
    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq
    import ray.data

    bucket = s3_server.create_bucket("smoke-bucket")
    out = f"{bucket}/out/"
    ray.data.range(1000, override_num_blocks=4).map_batches(lambda b: {"id": b["id"], "sq": b["id"] ** 2}) \
        .write_parquet(out)
    fs, path = pafs.FileSystem.from_uri(out)  # URI only: the endpoint comes from AWS_ENDPOINT_URL
    files = [i.path for i in fs.get_file_info(pafs.FileSelector(path)) if i.path.endswith(".parquet")]
    assert len(files) >= 1
    back = ray.data.read_parquet(out)
    assert back.count() == 1000 and sorted(back.columns()) == ["id", "sq"]
    assert ray.data.read_parquet(out, filesystem=s3_server.filesystem()).count() == 1000

    @ray.remote
    def write_one(uri: str) -> int:  # a Ray worker resolves the URI itself
        fs, p = pafs.FileSystem.from_uri(uri)
        pq.write_table(pa.table({"x": list(range(7))}), p, filesystem=fs)
        return fs.get_file_info(p).size

    assert ray.get(write_one.remote(f"{bucket}/single/x.parquet")) > 0
    assert pq.read_table("smoke-bucket/single/x.parquet", filesystem=s3_server.filesystem()).num_rows == 7
