"""Dataset converters: ISIC 2018, DRIVE, BraTS 2021 / 2023 GLI -> nnU-Net raw datasets, plus synthetic releases."""
