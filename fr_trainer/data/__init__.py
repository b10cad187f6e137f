"""fr_trainer.data: RecordIO data, loaders, samplers and the synthetic face-identity set.

Modules (imported on demand; DALI and torchvision stay optional):

- `recordio`   byte-compatible MXNet RecordIO: RecordWriter, RecordReader, IRHeader, pack, unpack
- `layout`     the insightface layout (header record, identity records): images and classes
- `dataset`    RecordDataset: a torch Dataset over a .rec (decode, flip, normalise, bad-record policy)
- `bad_records` BadRecordError (one line), on_bad=skip notes and the per-rank BadRecordTally
- `check`      check_dataset: every record, the index and the layout (`fr-trainer check-data`)
- `decode`     Pillow decode, torchvision GPU decode (`vision` extra), normalisation
- `loader`     build_loader / PrefetchLoader: DataLoader workers + device-side normalisation
- `samplers`   DistributedSampler (seeded, resumable) and PKBatchSampler (P classes x K images)
- `dali`       DaliLoader and the image-only index for `fn.readers.mxnet` (`dali` extra)
- `faces`      the parametric face renderer; `synthetic`: generate() and `fr-trainer synth`
- `pack`       class-per-folder images -> .rec/.idx (`fr-trainer pack`)
- `bench`      `fr-trainer bench data`
"""
