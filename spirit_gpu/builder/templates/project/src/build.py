"""Build-time step (scripts/build.sh): put model weights into the image.

Downloading at build time keeps cold starts short. For example, with
huggingface_hub in requirements.txt:

    from huggingface_hub import snapshot_download
    snapshot_download("org/model", local_dir="/app/models/model")
"""


def main() -> None:
    print("build.py: nothing to download yet; edit src/build.py to fetch model weights")


if __name__ == "__main__":
    main()
