"""Published measurements the phantom is calibrated against (docs/phantom.md names each).

One place for every anchor: `benchmarks/phantom_calibration.py` prints the phantom beside
them and tests/test_phantom.py checks the generator against the ranges marked as targets.
Each entry keeps its source as text; `status` says how it was checked:
  'published'  the number as printed in the source (table or abstract);
  'derived'    computed by a third party from the public dataset's labels;
  'measured'   measured by us on the vendored ICBM 2009c template (its README);
  'memory'     a textbook value we could not check against the text (say so when used).
"""

from __future__ import annotations

# FLAIR intensity thresholding, best possible Dice: the threshold chosen on the test set,
# Dice pooled over all test voxels, then connected-component filtering.
MEISSEN_2021 = ("Meissen, Kaissis & Rueckert, Challenging current semi-supervised anomaly "
                "segmentation methods for brain MRI, BrainLes 2021 (arXiv:2109.06023), Table 2")
THRESHOLD_TARGETS = {
    ("tumour", "flair"): {"dataset": "BraTS", "published": 0.738, "source": MEISSEN_2021,
                          "target": {2: (0.64, 0.84), 3: (0.64, 0.84)}},
    ("ms", "flair"): {"dataset": "MSLUB", "published": 0.613, "source": MEISSEN_2021,
                      "target": {2: (0.50, 0.72)}},
}
# WMH (0.557) has no phantom kind of its own: the MS kind stands in for small WM lesions.
WMH_FLAIR_THRESHOLD_DICE = 0.557

BRATS18 = ("BraTS 2018 training set, 285 cases (Bakas et al. 2018, arXiv:1811.02629): "
           "label statistics computed from the released labels by openmedlab "
           "Awesome-Medical-Dataset, resources/BraTS18.md")
ATLAS2 = ("ATLAS v2.0 training set, 655 cases (Liew et al. 2022, Sci Data 9:320): "
          "lesion volumes computed from the released masks by openmedlab "
          "Awesome-Medical-Dataset, resources/ATLASv2.0.md")
PONGRATZ = ("Pongratz et al. 2023, NeuroImage: Clinical 37:103311, 330 early MS patients "
            "(abstract)")
WANG_1997 = "Wang, Lai, Thompson & Miller 1997, J Neurol Neurosurg Psychiatry 63:452 (abstract)"

# Lesion volumes (ml) and counts. `volume_ml["median"]` is the band the median of a few
# default lesion subjects must lie in (tests/test_phantom.py; a band for a small sample,
# wider than the source's spread of medians); the benchmark prints the dataset's own.
ANCHORS = {
    "tumour": {
        "volume_ml_text": "BraTS'18 medians: oedema 46.9, necrotic/non-enh. core 10.8, "
                          "enhancing 14.6 (sum 72); oedema 2.8-214",
        "volume_ml": {"median": (30.0, 120.0), "min": 2.8},
        "core_share_text": "(10.8 + 14.6) / 72 = 0.35 (ratio of medians)",
        "source": BRATS18, "status": "derived",
    },
    "stroke": {
        "volume_ml_text": "ATLAS v2.0: median ~5, range 0.01-497",
        "volume_ml": {"median": (4.0, 30.0)},
        "source": ATLAS2, "status": "derived",
    },
    "ms": {
        "volume_ml_text": "periventricular load 2.3 per patient (Pongratz 2023); "
                          "MSLUB loads not retrieved",
        "volume_ml": {"median": (3.0, 15.0)},
        "count_text": "13 subcortical lesions per patient on average (Pongratz 2023)",
        "count": {"median": (8, 30)},
        "lesion_size_text": "80 % of lesions < 80 mm2 in cross-section, 20 % < 10 mm2 "
                            "(~1 % of the load) (Wang 1997)",
        "source": PONGRATZ + "; " + WANG_1997, "status": "published",
    },
}

# Location priors (`lesions.<kind>.location_p / site_p / territory_p` hold the weights).
LARJAVAARA_2007 = ("Larjavaara et al. 2007, Neuro-Oncology 9:319 (abstract): gliomas frontal "
                   "40 %, temporal 29 %, parietal 14 %, occipital 3 %, deeper structures 14 %")
NG_2007 = ("Ng et al. 2007, Stroke, doi:10.1161/STROKEAHA.106.475483 (abstract, 2213 "
           "first-ever ischaemic strokes): MCA 50.8 %, small-vessel 12.8 %")
ARBOIX_2009 = ("Arboix et al. 2009, BMC Neurology, PMC2714497 (abstract, Sagrat Cor "
               "registry, 2704 cerebral infarcts): ACA 1.8 %; 1355 MCA and 232 PCA infarcts "
               "(PCA 8.6 %, our division)")
LOCATION_ANCHORS = {
    "tumour": {"config": "location_p", "text": LARJAVAARA_2007, "status": "published"},
    "stroke": {"config": "territory_p", "text": NG_2007 + "; " + ARBOIX_2009 + "; the other "
               "26 % (vertebrobasilar, watershed, multiple) not modelled",
               "status": "published"},
    "ms": {"config": "site_p", "text": "subcortical lesions the most frequent (13.0 per "
           "patient), periventricular the largest volume (2.3 ml per patient), Pongratz 2023; "
           "the shares are ours", "status": "published (ordering only)"},
}

# Healthy tissue contrast of the ICBM 2009c template itself (real MRI averages, measured
# on voxels with tissue probability > 0.9; vendored README): ratio to WM per modality.
ICBM_CONTRAST = {
    "t1": {"gm": 6563 / 8809, "csf": 2765 / 8809},
    "t2": {"gm": 5500 / 3941, "csf": 9412 / 3941},
    "pd": {"gm": 8546 / 6844, "csf": 9129 / 6844},
}

FISCHL_2000 = "Fischl & Dale 2000, PNAS 97:11050 (abstract and p. 11052)"
# Healthy anatomy of one adult subject (the ICBM subjects averaged 25 years).
ANATOMY_ANCHORS = {
    "thickness_mm": {"text": "mean 2.5 (range 1-4.5), between-subject SD < 0.5",
                     "target": (2.0, 3.3), "source": FISCHL_2000, "status": "published"},
    "csf_fraction": {"text": "CSF 11.4 % of intracranial volume, pooled ages (Matsumae "
                             "1996); 18.7 % in the 20s incl. cisterns (Yamada 2023)",
                     "target": (0.09, 0.20), "status": "published (abstracts)"},
    "ventricle_ml": {"text": "16.2 ml in the 20s, 24.9 ml in the 40s (Neurosci Lett 2006)",
                     "target": (8.0, 40.0), "status": "published (abstract)"},
    "gm_wm_edge_mm": {"text": "one subject's partial volume: about one voxel (a box PSF: "
                              "10-90 % over 0.8 voxel) plus the acquisition blur",
                      "target_voxels": (0.6, 1.6), "status": "physics"},
}
