"""A stand-in for EC2, for lab tests: moto's server on 127.0.0.1, run inside the lab's client namespace.

Its instances sit at exactly the lab hosts' private addresses, and GetConsoleOutput of an instance answers with
CONSOLE_DIR/<private address>.txt (what the test writes: cloud-init's host key block, true or forged).
It writes contract v1 outputs for those instances, prints `ready`, and serves until it is stopped.

    python moto_cloud.py PORT ADDRESS,ADDRESS,... CONSOLE_DIR OUTPUTS_FILE
"""

import json
import sys
import time
from pathlib import Path

import boto3
from moto.core.responses import ActionResult
from moto.core.utils import utcnow
from moto.ec2.responses.general import General
from moto.ec2.utils import Base64EncodedString
from moto.server import ThreadedMotoServer

from flambe_iac.inputs.outputs import contract_document


def serve(port: int, addresses: list[str], console_dir: Path, outputs: Path) -> None:
    def console_output_from_directory(self):
        instance = self.ec2_backend.get_instance(self._get_param("InstanceId"))
        page = console_dir / f"{instance.private_ip}.txt"
        text = page.read_text() if page.exists() else "[    1.000000] booting...\n"
        return ActionResult({"InstanceId": instance.id, "Timestamp": utcnow(),
                             "Output": Base64EncodedString.from_raw_string(text)})

    General.get_console_output = console_output_from_directory
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    ec2 = boto3.client("ec2", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.1.0/24")["Subnet"]["SubnetId"]
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    hosts = []
    for address in addresses:
        (instance,) = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, SubnetId=subnet,
                                        PrivateIpAddress=address)["Instances"]
        hosts.append({"id": instance["InstanceId"], "public_ip": None, "private_ip": instance["PrivateIpAddress"],
                      "public_dns": None})
    outputs.write_text(json.dumps(contract_document("console-keys", "ubuntu", "us-east-1", hosts[0], hosts[1:])))
    print("ready", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.argv[2].split(","), Path(sys.argv[3]), Path(sys.argv[4]))
