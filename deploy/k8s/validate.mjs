// Checks every object of rendered manifests against the Kubernetes API schema, offline.
//   kubectl kustomize deploy/k8s | node deploy/k8s/validate.mjs
// (npm ci in deploy/k8s first). The models of the npm package kubernetes-models check types, required
// fields and formats; they let unknown field names through, which the tests' assertions partly cover.
import { parseAllDocuments } from "yaml";

const text = await new Promise((resolve, reject) => {
  let data = "";
  process.stdin.setEncoding("utf8");
  process.stdin.on("data", chunk => (data += chunk));
  process.stdin.on("end", () => resolve(data));
  process.stdin.on("error", reject);
});

let valid = 0;
const failures = [];
for (const doc of parseAllDocuments(text)) {
  if (doc.errors.length > 0) {
    failures.push(`YAML: ${doc.errors.map(e => e.message).join("; ")}`);
    continue;
  }
  const object = doc.toJS();
  if (object === null) continue;
  const name = `${object.kind}/${object.metadata?.name} (${object.apiVersion})`;
  let Model;
  try {
    // apiVersion "v1" is the core group; "apps/v1" is group apps, version v1: the package's module paths.
    Model = (await import(`kubernetes-models/${object.apiVersion}`))[object.kind];
  } catch {
    Model = undefined;
  }
  if (Model === undefined) {
    failures.push(`${name}: no schema for this apiVersion and kind`);
    continue;
  }
  try {
    new Model(object).validate();
    valid++;
  } catch (e) {
    failures.push(`${name}: ${e.message}`);
  }
}

for (const f of failures) console.error(`invalid: ${f}`);
console.log(`${valid} valid, ${failures.length} invalid`);
process.exit(failures.length === 0 && valid > 0 ? 0 : 1);
