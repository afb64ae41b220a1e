// KEDA's kinds validated by KEDA's own CRD schemas (npm @kubernetes-models/keda, scripts/install-tools),
// each document by the model of its apiVersion and kind. For scripts/deploy_checks.py:
//   node scripts/deploy_keda.mjs NODE_MODULES < documents.json  ->  {"Kind/name": null or the error}
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const out = {};
for (const doc of JSON.parse(readFileSync(0, "utf8"))) {
  const name = `${doc.kind}/${doc.metadata?.name}`;
  try {
    const file = join(process.argv[2], "@kubernetes-models/keda", doc.apiVersion, `${doc.kind}.js`);
    const { [doc.kind]: Model } = await import(pathToFileURL(file).href);
    new Model(doc).validate();
    out[name] = null;
  } catch (error) {
    out[name] = String(error?.message ?? error);
  }
}
console.log(JSON.stringify(out));
