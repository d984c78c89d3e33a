export { migrateEslSchema } from "./migrate-esl-schema.ts"
export {
  type EslJobResult,
  EslWriterError,
  JobExistsError,
  type LabelAssignment,
  type LabelJobOptions,
  type PriceChange,
  type PriceChangeOptions,
  StoredProductError,
  upsertProducts,
  writeLabelJob,
  writePriceChange,
} from "./write-esl-job.ts"
