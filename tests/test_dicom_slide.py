"""DICOM whole-slide images (issue 14, item 14): a two-level DICOM WSI written here with pydicom from the bundled real
HGSC region (level 0 at 0.5 µm/px, level 1 its 2× box-filtered copy, uncompressed RGB tiles, TILED_FULL) reads
through wsidicom with OpenSlide's conventions, as OpenSlide 4 reads the same files, and prepares into a store.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("wsidicom")

from histosynth.data.dicom_slide import DicomSlide  # noqa: E402
from histosynth.data.slide_patches import prepare_slides  # noqa: E402
from histosynth.data.slides import open_slide, read_region, slide_magnification  # noqa: E402

TILE = 128


def _code(value: str, scheme: str, meaning: str):
    item = pydicom.Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return pydicom.Sequence([item])


def write_level(path, rgb: np.ndarray, mpp: float, uids: dict, original: bool) -> None:
    """One VL Whole Slide Microscopy Image instance: ``rgb`` cut into TILE px frames (white where it ends)."""
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    h, w = rgb.shape[:2]
    frames = []
    for r in range(-(-h // TILE)):
        for c in range(-(-w // TILE)):
            frame = np.full((TILE, TILE, 3), 255, np.uint8)
            part = rgb[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE]
            frame[:part.shape[0], :part.shape[1]] = part
            frames.append(frame)
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.6"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uids["study"], uids["series"]
    ds.FrameOfReferenceUID = uids["frame"]
    ds.Modality, ds.PatientName, ds.PatientID, ds.ContainerIdentifier = "SM", "test", "1", "slide-1"
    ds.StudyDate, ds.StudyTime, ds.ContentDate, ds.ContentTime = "20261204", "120000", "20261204", "120000"
    ds.AcquisitionDateTime, ds.Manufacturer, ds.SeriesNumber, ds.InstanceNumber = "20261204120000", "test", 1, 1
    ds.ImageType = ["ORIGINAL" if original else "DERIVED", "PRIMARY", "VOLUME", "NONE" if original else "RESAMPLED"]
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.Rows = ds.Columns = TILE
    ds.NumberOfFrames, ds.TotalPixelMatrixRows, ds.TotalPixelMatrixColumns = len(frames), h, w
    ds.TotalPixelMatrixFocalPlanes, ds.NumberOfOpticalPaths = 1, 1
    optical = pydicom.Dataset()
    optical.OpticalPathIdentifier = "0"
    optical.IlluminationTypeCodeSequence = _code("111744", "DCM", "Brightfield illumination")
    optical.IlluminationColorCodeSequence = _code("414298005", "SCT", "Full Spectrum")
    ds.OpticalPathSequence = pydicom.Sequence([optical])
    ds.ImagedVolumeWidth, ds.ImagedVolumeHeight, ds.ImagedVolumeDepth = w * mpp / 1000, h * mpp / 1000, 0.001
    measures = pydicom.Dataset()
    measures.PixelSpacing, measures.SliceThickness = [mpp / 1000, mpp / 1000], 0.001
    shared = pydicom.Dataset()
    shared.PixelMeasuresSequence = pydicom.Sequence([measures])
    ds.SharedFunctionalGroupsSequence = pydicom.Sequence([shared])
    origin = pydicom.Dataset()
    origin.XOffsetInSlideCoordinateSystem = origin.YOffsetInSlideCoordinateSystem = 0
    ds.TotalPixelMatrixOriginSequence = pydicom.Sequence([origin])
    ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
    ds.VolumetricProperties, ds.SpecimenLabelInImage, ds.BurnedInAnnotation = "VOLUME", "NO", "NO"
    ds.PixelData = np.stack(frames).tobytes()
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def dicom_slide(tmp_path_factory):
    """slides/case-1/: level 0 (640 × 768 px of real tissue) and level 1 (its 2× box filter)."""
    from pydicom.uid import generate_uid

    from histosynth.data.formats import read_nuclei
    from histosynth.quickstart import bundled_sample

    (region,) = read_nuclei("folder", bundled_sample(), magnification="20x")
    level0 = np.ascontiguousarray(region.image[:640, :768])
    level1 = np.asarray(Image.fromarray(level0).resize((384, 320), Image.Resampling.BOX))
    folder = tmp_path_factory.mktemp("dicom") / "slides" / "case-1"
    folder.mkdir(parents=True)
    uids = {"study": generate_uid(), "series": generate_uid(), "frame": generate_uid()}
    write_level(folder / "level-0.dcm", level0, 0.5, uids, original=True)
    write_level(folder / "level-1.dcm", level1, 1.0, uids, original=False)
    return folder, level0, level1


def test_a_dicom_slide_reads_with_openslides_conventions(dicom_slide):
    folder, level0, level1 = dicom_slide
    slide = open_slide(folder)
    assert isinstance(slide, DicomSlide)
    assert slide.dimensions == (768, 640) and slide.level_count == 2 and slide.level_downsamples == (1.0, 2.0)
    assert slide_magnification(slide, folder) == (20.0, "mpp")
    assert np.array_equal(read_region(slide, (0, 0), 0, (768, 640), str(folder)), level0)
    # level-0 location, level size: (200, 100) at level 1 is level-1 pixel (100, 50)
    assert np.array_equal(read_region(slide, (200, 100), 1, (128, 96), str(folder)), level1[50:146, 100:228])
    assert isinstance(open_slide(folder / "level-1.dcm"), DicomSlide)  # one of its files names the slide
    openslide = pytest.importorskip("openslide")
    theirs = openslide.OpenSlide(str(folder / "level-0.dcm"))
    assert theirs.level_dimensions == slide.level_dimensions
    for level, size in ((0, (300, 200)), (1, (150, 100))):
        ours = read_region(slide, (202, 98), level, size, str(folder))
        assert np.array_equal(ours, np.asarray(theirs.read_region((202, 98), level, size))[..., :3]), level


def test_a_folder_of_dicom_slides_prepares_into_a_store(dicom_slide, tmp_path):
    folder, level0, _ = dicom_slide
    store = prepare_slides([folder.parent], tmp_path / "store", patch=128, magnification="20x", tissue_threshold=0.0,
                           progress=False)
    assert len(store) == 30  # 5 × 6 tiles of 128 px
    for i in (0, 17, 29):
        rec = store.records[i]
        assert rec["source"] == str(folder)
        y, x = rec["y"], rec["x"]
        assert np.array_equal(store[i]["image"], level0[y:y + 128, x:x + 128])
