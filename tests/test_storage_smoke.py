from clipforge.storage import uri as storage


def test_s3_roundtrip(s3_bucket):
    target = f"s3://{s3_bucket}/a/b.json"
    storage.write_json(target, {"x": 1})
    assert storage.read_json(target) == {"x": 1}
    assert storage.list_names(f"s3://{s3_bucket}/a") == ["b.json"]
